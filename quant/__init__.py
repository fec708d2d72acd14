"""lowbit: low-bit weight quantization for Hugging Face causal LMs.

from quant import load_model, quantize_, GPTQConfig, save_quantized, load_quantized
"""

from quant import d2quant as _d2quant  # noqa: F401  (registers the d2quant pass)
from quant import fpt as _fpt  # noqa: F401  (registers the fpt pass)
from quant import hf_integration as _hf  # noqa: F401  (registers quant_method "lowbit" with transformers)
from quant import quantizers as _quantizers  # noqa: F401  (registers the rtn/gptq passes)
from quant import rotation as _rotation  # noqa: F401  (registers the rotate pass)
from quant.allocation import AllocationConfig, allocate
from quant.checkpoint import load_quantized, save_quantized
from quant.errors import QuantError
from quant.fpt import FPTConfig
from quant.grid import QuantSpec
from quant.inputops import ActQuantConfig
from quant.models import load_model
from quant.passes import PASSES, QuantContext, register_pass, run_pipeline
from quant.quantizers import GPTQConfig, RTNConfig
from quant.quantlinear import QuantLinear

__version__ = "0.1.0"

__all__ = [
    "ActQuantConfig",
    "FPTConfig",
    "AllocationConfig",
    "allocate",
    "GPTQConfig",
    "PASSES",
    "QuantContext",
    "QuantError",
    "QuantLinear",
    "QuantSpec",
    "RTNConfig",
    "load_model",
    "load_quantized",
    "register_pass",
    "run_pipeline",
    "save_quantized",
]

"""lowbit: low-bit weight quantization for Hugging Face causal LMs.

from quant import load_model, quantize_, GPTQConfig, save_quantized, load_quantized
"""

from quant.engine.passes import PASSES, QuantContext, register_pass, run_pipeline
from quant.errors import QuantError
from quant.formats import hf_integration as _hf  # noqa: F401  (registers quant_method "lowbit" with transformers)
from quant.formats.checkpoint import load_quantized, save_quantized
from quant.formats.models import load_model
from quant.methods import d2quant as _d2quant  # noqa: F401  (registers the d2quant pass)
from quant.methods import finetune as _finetune  # noqa: F401  (registers the finetune pass)
from quant.methods import fpt as _fpt  # noqa: F401  (registers the fpt pass)
from quant.methods import lmhead as _lmhead  # noqa: F401  (registers the lmhead pass)
from quant.methods import quantizers as _quantizers  # noqa: F401  (registers the rtn/gptq passes)
from quant.methods import rotation as _rotation  # noqa: F401  (registers the rotate pass)
from quant.methods.allocation import AllocationConfig, allocate
from quant.methods.fpt import FPTConfig
from quant.methods.quantizers import GPTQConfig, RTNConfig
from quant.numerics.grid import QuantSpec
from quant.runtime.inputops import ActQuantConfig
from quant.runtime.quantlinear import QuantLinear

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

"""``transformers.AutoModelForCausalLM.from_pretrained`` for our checkpoints, through transformers' public
quantizer registry (``register_quantization_config`` / ``register_quantizer``).

``import quant`` registers ``quant_method: "lowbit"``. Before transformers loads the weights, the
quantizer swaps every linear named in ``quantization_config.modules`` for the packed class its
``format`` names (``QuantLinear``, ``DSQLinear`` or ``ScaleCodedLinear``) and gives the DAC norms their bias, so the
checkpoint's tensors land in the same buffers :func:`quant.formats.checkpoint.load_quantized` fills and the
logits are identical. Differences from ``load_quantized``: transformers does not check our
``SHA256SUMS`` (use ``load_quantized`` to verify a download), and the model cannot be re-saved
with ``save_pretrained`` (use ``quant.save_quantized``).
"""

from __future__ import annotations

import copy

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from quant.engine.structure import normalize
from quant.formats import qconfig
from quant.formats.checkpoint import QUANT_METHOD, empty_packed
from quant.runtime.dac import add_norm_bias
from quant.runtime.inputops import attach_from_config


class LowbitConfig(QuantizationConfigMixin):
    """Our ``quantization_config`` as transformers holds it: every key of the checkpoint's config, as is."""

    def __init__(self, modules: dict | None = None, norm_biases: list | None = None, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        self.norm_biases = norm_biases or []
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


class LowbitHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads pre-quantized checkpoints only

    def validate_environment(self, *args, **kwargs) -> None:
        qc = self.quantization_config
        qconfig.check_version(qc.to_dict(), "the checkpoint")
        qconfig.validate(qc.to_dict(), "(from_pretrained)")  # the same schema as load_quantized

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        import torch

        qc = self.quantization_config
        dtype = next(model.parameters()).dtype
        normalize(model)
        for name, spec in qc.modules.items():
            lin = qconfig.check_linear(model, name, spec, "(from_pretrained)")
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, empty_packed(lin, spec, dtype))
            # every tensor comes from the checkpoint: the owner's own weight init (GPT-2's reaches into
            # c_proj.weight, which a packed linear does not have) must not run
            owner._is_hf_initialized = True
        for name in qc.norm_biases:
            norm = qconfig.check_norm(model, name, "(from_pretrained)")
            add_norm_bias(norm, torch.zeros_like(norm.weight, device="cpu"))
        attach_from_config(model, qc.to_dict())
        model.lowbit_config = qc.to_dict()

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.eval()
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register once (a second ``import`` of this module, e.g. under a reload, must not raise)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


register()

"""Shared fixtures: the real SmolLM2-135M (embedded, converted once) and tiny random-init models.

Tiny models are for fast mechanics (save/load, CLI, structure discovery); quality claims use SmolLM2 only.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smollm2():
    from quant.formats.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2.tokenizer


def tiny_config(model_type: str = "llama", **kw):
    from transformers import AutoConfig

    base = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=torch.float32).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama, tokenizer):
    """A float tiny Llama saved as a normal HF folder (safetensors + tokenizer)."""
    d = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def calib(tokenizer):
    from calibrate import calibration_windows

    return calibration_windows(tokenizer, "c4", 8, 128, seed=0)

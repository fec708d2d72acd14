"""The CPU decode attention (``torch.ops.lowbit_cpu.decode_attention`` and transformers' ``"lowbit_cpu"``
attention implementation) against torch's scaled-dot-product attention, on fresh random inputs."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F

import kernels_cpu
from kernels_cpu import attention


@pytest.fixture(scope="module")
def ext():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the kernels cannot be built")
    mod = kernels_cpu.EXTENSION.load()
    assert mod is not None, kernels_cpu.EXTENSION.error
    return mod


def reference(q, k, v, mask, scale):
    """float64 SDPA with the KV heads repeated for grouped queries: [B, 1, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("batch,hq,hkv,length,dim", [(1, 9, 3, 384, 64), (2, 4, 4, 37, 40), (3, 8, 2, 5, 17)])
def test_decode_attention_matches_sdpa(ext, batch, hq, hkv, length, dim):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(batch, hq, 1, dim, generator=g)
    k, v = (torch.randn(batch, hkv, length, dim, generator=g) for _ in range(2))
    mask = torch.rand(batch, length, generator=g) < 0.7  # holes (padding) and an unfilled static-cache tail
    mask[:, 0] = True
    mask[:, length * 3 // 4:] = False
    scale = dim**-0.5
    got = torch.ops.lowbit_cpu.decode_attention(q, k, v, mask, scale)
    assert got.shape == (batch, 1, hq, dim)
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, scale), rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_nothing_past_the_mask_and_zeros_an_empty_row(ext):
    q = torch.randn(2, 2, 1, 16)
    k, v = torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8, 16)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[0, :, 3:], poisoned_v[0, :, 3:] = float("nan"), float("nan")  # positions the mask excludes
    got = torch.ops.lowbit_cpu.decode_attention(q, poisoned_k, poisoned_v, mask, 0.25)
    torch.testing.assert_close(got[0].double(), reference(q[:1], k[:1], v[:1], mask[:1], 0.25)[0],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], torch.zeros(1, 2, 16))  # no allowed position: zeros, not NaN


def test_decode_attention_rejects_wrong_shapes(ext):
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 4, 8)  # 3 query heads over 2 KV heads
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        torch.ops.lowbit_cpu.decode_attention(q, k, k, torch.ones(1, 4, dtype=torch.bool), 1.0)


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_attention_function_serves_decode_and_hands_the_rest_to_sdpa(ext, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    module = _Module()
    k, v = torch.randn(1, 2, 12, 32, generator=g), torch.randn(1, 2, 12, 32, generator=g)
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    mask[..., 9:] = False
    q = torch.randn(1, 4, 1, 32, generator=g)
    ours, _ = attention.attention_forward(module, q, k, v, mask, scaling=0.2)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)

    calls = []
    monkeypatch.setattr(torch.ops.lowbit_cpu, "decode_attention", lambda *a: calls.append(a))
    q3 = torch.randn(1, 4, 3, 32, generator=g)  # prefill: three query tokens
    mask3 = torch.ones(1, 1, 3, 12, dtype=torch.bool).tril(9)
    ours, _ = attention.attention_forward(module, q3, k, v, mask3, scaling=0.2)
    torch.testing.assert_close(ours, sdpa_attention_forward(module, q3, k, v, mask3, scaling=0.2)[0])
    attention.attention_forward(module, q, k, v, mask.float(), scaling=0.2)  # an additive float mask
    attention.attention_forward(module, q.double(), k.double(), v.double(), mask, scaling=0.2)
    assert not calls

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from quant.errors import QuantError
from quant.numerics.packing import pack, unpack


def ref_pack(codes, bits):
    """The documented layout, word by word: code j of a row in word j // k at bit bits * (j % k), k = 32 // bits."""
    k = 32 // bits
    rows, n = codes.shape
    words = [[0] * (-(-n // k)) for _ in range(rows)]
    for r in range(rows):
        for j in range(n):
            words[r][j // k] |= int(codes[r, j]) << (bits * (j % k))
    return torch.tensor(words, dtype=torch.int64).reshape(rows, -1)  # as unsigned 32-bit values


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), cols=st.integers(1, 100), seed=st.integers(0, 2**31))
@example(bits=4, rows=2, cols=64, seed=0)  # whole words: no padding word may follow
def test_pack_unpack_roundtrip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert torch.equal(packed.to(torch.int64) & 0xFFFFFFFF, ref_pack(codes, bits))  # the layout, and no padding word
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_three_bit_layout_is_word_aligned():
    # 10 codes per word at offsets 0, 3, ..., 27; the top two bits stay zero even for all-ones codes.
    codes = torch.full((1, 20), 7, dtype=torch.uint8)
    packed = pack(codes, 3)
    assert packed.shape == (1, 2)
    assert all((int(w) & 0xFFFFFFFF) == 2**30 - 1 for w in packed[0])
    # code j sits in word j // 10 at bit 3 * (j % 10)
    one = torch.zeros(1, 20, dtype=torch.uint8)
    one[0, 13] = 5
    assert (int(pack(one, 3)[0, 1]) & 0xFFFFFFFF) == 5 << 9


def test_high_bit_codes_survive_signed_storage():
    codes = torch.full((2, 8), 15, dtype=torch.uint8)  # fills all 32 bits: negative as int32
    packed = pack(codes, 4)
    assert int(packed[0, 0]) == -1
    assert torch.equal(unpack(packed, 4, 8), codes)


def test_out_of_range_codes_rejected():
    with pytest.raises(QuantError):
        pack(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(QuantError):
        pack(torch.zeros(1, 4, dtype=torch.uint8), 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sliced_rows_match_whole(bits, monkeypatch):
    """Big tensors are packed a slice of rows at a time (bounded int64 temporaries): the slices' seams, a short
    last slice and an out-of-range code in a later slice behave as the whole tensor does."""
    from quant.numerics import packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (23, 40), generator=g, dtype=torch.int64).to(torch.uint8)
    whole = pack(codes, bits), packing.pack_dense(codes, bits)
    monkeypatch.setattr(packing, "SLICE_CODES", 3 * 40)  # 3 rows a slice: 8 slices, the last of 2 rows
    sliced = pack(codes, bits), packing.pack_dense(codes, bits)
    assert torch.equal(sliced[0], whole[0]) and torch.equal(sliced[1], whole[1])
    assert torch.equal(unpack(sliced[0], bits, 40), codes)
    assert torch.equal(packing.unpack_dense(sliced[1], bits, 40), codes)
    if bits < 8:
        bad = codes.to(torch.int64)
        bad[21, 5] = 2**bits
        with pytest.raises(QuantError, match="out of range"):
            pack(bad, bits)
        with pytest.raises(QuantError, match="out of range"):
            packing.pack_dense(bad, bits)

"""Bundled text: the evaluation texts are what the protocol says, and calibration never reads them."""

import pytest

from calibrate import c4_eval_text, eval_text, load_calibration_text
from calibrate.data import C4_SAMPLE, WIKITEXT2_TEST, _jsonl_docs
from quant.errors import QuantError


def test_wikitext2_join_matches_the_protocol():
    assert len(eval_text()) == 1_294_336


def test_c4_calibration_never_reads_the_c4_evaluation_slice():
    docs = _jsonl_docs(C4_SAMPLE)
    assert len(docs) == 2000
    calib = load_calibration_text("c4")
    assert c4_eval_text() == " ".join(docs[:1000])
    assert calib == "\n\n".join(docs[1000:])
    assert not any(d in calib for d in docs[:1000] if len(d) > 200)
    assert load_calibration_text("c4-all") == "\n\n".join(docs)


def test_refuses_to_calibrate_on_the_test_split():
    with pytest.raises(QuantError, match="refusing to calibrate"):
        load_calibration_text(str(WIKITEXT2_TEST))

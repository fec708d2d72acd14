"""A run as a recipe: the flags build one, a file gives one, the checkpoint records one that replays the run."""

from __future__ import annotations

import json

import pytest
from test_streaming import QUICK, float_dir, ok, quantize, weights

from quant.engine.recipe import steps_from
from quant.errors import QuantError


def test_recipe_entries_are_checked_field_by_field():
    steps = steps_from([{"name": "rotate"}, {"name": "d2quant", "config": {"bits": 2, "group_size": 32}}], "r")
    assert [n for n, _ in steps] == ["rotate", "d2quant"] and steps[1][1].bits == 2 and steps[1][1].dsq is True
    fpt = steps_from([{"name": "fptquant", "config": {"transforms": {"weight": {"bits": 3, "group_size": 64}}}}], "r")
    assert fpt[0][1].transforms.weight.bits == 3  # nested configs are built as their dataclasses
    for bad, words in [
        ([{"name": "gptq", "config": {"bitz": 4}}], "no field 'bitz'"),
        ([{"name": "gptq", "config": {"bits": "4"}}], "expects int"),
        ([{"name": "gptq", "config": {"bits": 5}}], "bits must be one of"),
        ([{"name": "gptq", "config": {"act_order": 1}}], "expects bool"),
        ([{"name": "rotate"}], "exactly one quantizer"),
        ([{"name": "gptq"}, {"name": "rtn"}], "exactly one quantizer"),
        ([{"name": "awq"}], "unknown method or pass 'awq'"),
        ({"passes": "gptq"}, "non-empty list"),
        ([{"name": "gptq", "extra": 1}], "unknown key 'extra'"),
    ]:
        with pytest.raises(QuantError, match=words.replace("(", r"\(")):
            steps_from(bad, "r")


def test_a_recipe_file_and_a_checkpoint_replay_the_flags_run(tmp_path, tokenizer):
    src = float_dir(tmp_path, tokenizer, "llama")
    ok(quantize(src, "--method", "gptq", "--bits", "3", *QUICK, "--out", tmp_path / "flags"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- name: gptq\n  config: {bits: 3, group_size: 32}\n")
    ok(quantize(src, "--recipe", recipe, *QUICK, "--out", tmp_path / "file"))
    assert weights(tmp_path / "file") == weights(tmp_path / "flags")
    ok(quantize(src, "--recipe", tmp_path / "flags" / "config.json", *QUICK, "--out", tmp_path / "replay"))
    assert weights(tmp_path / "replay") == weights(tmp_path / "flags")
    qc = json.loads((tmp_path / "flags" / "config.json").read_text())["quantization_config"]
    assert [p["name"] for p in qc["passes"]] == ["gptq"] and qc["passes"][0]["config"]["bits"] == 3
    recipe.write_text("- name: gptq\n  config: {bits: 3, group: 32}\n")
    r = quantize(src, "--recipe", recipe, *QUICK, "--out", tmp_path / "bad")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no field 'group'" in r.stderr

"""A run as a recipe: the flags build one, a file gives one, the checkpoint records one that replays the run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer
import typer.main
from test_streaming import QUICK, float_dir, ok, quantize, weights
from typer.testing import CliRunner

import cli
from quant.engine.options import cli_options, option
from quant.engine.passes import PASSES, PassInfo
from quant.engine.recipe import load_recipe, presets, steps_from
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


def test_bundled_presets_load_by_name(tmp_path, monkeypatch):
    assert presets() == ["w3-best", "w3-fast"]
    fast, best = load_recipe("w3-fast"), load_recipe("w3-best")
    assert [n for n, _ in fast] == ["rotate", "d2quant"] and [n for n, _ in best] == ["rotate", "d2quant", "finetune"]
    q = fast[1][1]
    assert (q.bits, q.group_size, q.dsq, q.scale_bits) == (3, 64, False, 8) and best[1][1] == q
    assert best[2][1].mode == "both"
    monkeypatch.chdir(tmp_path)  # a file of that name in the working directory is the recipe, not the preset
    (tmp_path / "w3-fast").write_text("- name: rtn\n  config: {bits: 4}\n")
    assert [n for n, _ in load_recipe("w3-fast")] == ["rtn"]
    with pytest.raises(QuantError, match="no such file .bundled presets: w3-best, w3-fast"):
        load_recipe("w3-fastest")


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


def test_every_pass_option_is_documented_by_its_config_and_offered_by_the_command():
    for info in PASSES.values():
        for f in dataclasses.fields(info.config_cls):
            assert f.metadata.get("help"), f"{info.name}.{f.name} has no help"
    params = typer.main.get_command(cli.app).commands["model"].params
    helps = {opt: p.help for p in params for opt in (*p.opts, *p.secondary_opts)}
    own = {"bits", "group_size", "seed", "allocation"}  # the command's own: they also name the output, the budget
    for o in cli_options(PASSES):
        for flag in o.flag.split("/"):
            assert flag in helps, flag
        if o.dest not in own:
            assert helps[o.flag.split("/")[0]] == o.help_text() and o.help in o.help_text()


def test_a_new_pass_brings_its_own_flag_help_and_validation(monkeypatch):
    @dataclasses.dataclass
    class ToyConfig:
        level: int = option(1, "How much toy.", "--toy-level")
        loud: bool = option(False, "Shout.", "--loud")

        def validate(self) -> None:
            if self.level < 0:
                raise QuantError("toy level must be >= 0")

    monkeypatch.setitem(PASSES, "toy", PassInfo("toy", lambda ctx, c: {}, ToyConfig, False, False))
    seen = []
    app = typer.Typer()

    @app.command()
    @cli.pass_options("toy")
    def run(name: str = typer.Option("x"), pass_values: dict | None = None) -> None:
        seen.append(cli._pass_config("toy", pass_values))

    runner = CliRunner()
    r = runner.invoke(app, ["--help"])
    assert "--toy-level" in r.output and "--no-loud" in r.output and "How much toy." in r.output
    assert runner.invoke(app, ["--toy-level", "3", "--loud"]).exit_code == 0
    assert runner.invoke(app, []).exit_code == 0
    assert seen == [ToyConfig(3, True), ToyConfig(1, False)]  # not given: the config's default
    r = runner.invoke(app, ["--toy-level", "-1"])
    assert isinstance(r.exception, QuantError) and "toy level" in str(r.exception)


def test_pass_flags_and_a_recipe_do_not_mix(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- name: gptq\n  config: {bits: 3, group_size: 32}\n")
    r = quantize(tmp_path / "absent", "--recipe", recipe, "--damp", "0.1", "--out", tmp_path / "q")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--recipe replaces the pass options" in r.stderr
    assert not (tmp_path / "q").exists()


def test_passes_command_lists_every_field():
    r = CliRunner().invoke(cli.app, ["passes", "d2quant"])
    assert r.exit_code == 0
    for f in dataclasses.fields(PASSES["d2quant"].config_cls):
        assert f"  {f.name}: " in r.output
    assert "dac_skip_first: int = 4" in r.output and "(--dsq/--no-dsq)" in r.output

"""The checkpoint fuzzer (tests/checkpoint_fuzzer.py) as a test: a seeded, bounded run in both formats through
every loader and the CLI; every case must end in a one-line error or an exact load.

``LOWBIT_FUZZ_CASES`` sets the number of cases (300 by default, about two minutes on two cores);
``LOWBIT_FUZZ_SEED`` another draw. ``python tests/checkpoint_fuzzer.py --cases 2000`` writes the full table.
"""

from __future__ import annotations

import os

from checkpoint_fuzzer import BAD, LOADERS, MUTATORS, fuzz, judge, markdown


def test_fuzzed_checkpoints_load_exactly_or_fail_in_one_line(tmp_path):
    cases = int(os.environ.get("LOWBIT_FUZZ_CASES", "300"))
    res = fuzz(cases, seed=int(os.environ.get("LOWBIT_FUZZ_SEED", "0")), work=tmp_path)
    summary = res["summary"]
    assert summary["failures"] == 0, markdown(summary, res["cases"])
    # the draw reached every loader, both formats and every family of mutation (a fuzzer that fuzzes nothing
    # passes too)
    assert set(summary["by_loader"]) == {ld for lds in LOADERS.values() for ld in lds}
    assert set(summary["formats"]) == {"lowbit", "gptq"}
    assert len(summary["by_kind"]) >= len(MUTATORS)
    assert summary["verdicts"].get("error", 0) > cases // 2 and summary["verdicts"].get("exact", 0) > 0


def test_the_judge_counts_what_it_should(tmp_path):
    d = tmp_path / "case" / "ckpt"
    d.mkdir(parents=True)
    case = {"dir": str(d), "fixture": "rtn", "loader": "load_quantized"}
    base = {("rtn", "load_quantized"): "abc"}
    assert judge(case, {"outcome": "loaded", "digest": "abc"}, base) == "exact"
    assert judge(case, {"outcome": "loaded", "digest": "abd"}, base) == "silent"
    assert judge(case, {"outcome": "error"}, base) == "error"
    (d.parent / "PWNED").write_text("x")
    assert judge(case, {"outcome": "error"}, base) == "code-exec"
    assert {"traceback", "hang", "crash", "silent", "code-exec"} <= set(BAD)

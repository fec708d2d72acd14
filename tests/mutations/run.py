"""Plant each deliberate bug of ``catalogue.py`` in a scratch copy of the project, run the tests meant to catch
it, and write which bugs survived: ``benchmarks/results/mutations.{json,md}``.

    python tests/mutations/run.py                 # every mutation (a few minutes on 2 cores)
    python tests/mutations/run.py --only NAME ... # some of them; other rows of the JSON are kept

The working tree is never edited: the project is copied once to a temporary folder, each bug is written
into the copy's file, the tests run there with that copy first on ``sys.path``, and the file is restored.
Exit status 1 when a bug survives or an entry no longer applies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalogue import MUTATIONS, Mutation  # noqa: E402

COPIED = ("quant", "moe", "calibrate", "kernels_cuda", "kernels_cpu", "tests", "cli.py", "pyproject.toml")
RESULTS = ROOT / "benchmarks" / "results" / "mutations"


def scratch_copy() -> Path:
    dst = Path(tempfile.mkdtemp(prefix="lowbit-mutants-"))
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc")
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dst / name))
    return dst


def run_one(m: Mutation, copy: Path, timeout: int) -> dict:
    path = copy / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return {"name": m.name, "status": "does not apply", "caught_by": None, "seconds": 0.0}
    path.write_text(original.replace(m.old, m.new))
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *m.tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        out, code = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired:
        out, code = "", -1
    finally:
        path.write_text(original)
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)  # "FAILED node id - message"
    if code == 0:
        status = "SURVIVED"
    elif code == 1 and failed:
        status = "caught"
    else:  # collection errors, crashes or a timeout also stop the bug, but say so
        status = "caught (timeout)" if code == -1 else f"caught (pytest exit {code})"
    return {
        "name": m.name,
        "status": status,
        "caught_by": failed[0] if failed else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def write_tables(rows: dict[str, dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    order = [m.name for m in MUTATIONS if m.name in rows]
    by_name = {m.name: m for m in MUTATIONS}
    data = {"mutations": [rows[n] | {"file": by_name[n].file, "why": by_name[n].why} for n in order]}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(RESULTS.with_suffix(".json"))
    survivors = [n for n in order if not rows[n]["status"].startswith("caught")]
    lines = [
        "# Mutation check",
        "",
        f"`python tests/mutations/run.py`: {len(order)} deliberate bugs, {len(survivors)} not caught.",
        "",
        "| bug | file | what it breaks | result | caught by | s |",
        "|---|---|---|---|---|---|",
    ]
    for n in order:
        r, m = rows[n], by_name[n]
        by = (r["caught_by"] or "").replace("tests/", "")
        lines.append(f"| `{n}` | {m.file} | {m.why} | {r['status']} | `{by}` | {r['seconds']} |")
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(RESULTS.with_suffix(".md"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="names of the mutations to run (default: all)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutation before it counts as a timeout")
    args = ap.parse_args()
    known = {m.name for m in MUTATIONS}
    unknown = set(args.only or ()) - known
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    previous = {}
    if RESULTS.with_suffix(".json").is_file() and args.only is not None:
        previous = {r["name"]: r for r in json.loads(RESULTS.with_suffix(".json").read_text())["mutations"]}
    copy = scratch_copy()
    try:
        rows = {n: r for n, r in previous.items() if n in known}
        for m in chosen:
            rows[m.name] = run_one(m, copy, args.timeout)
            r = rows[m.name]
            print(f"{r['status']:>16}  {m.name:<40} {r['caught_by'] or ''}  ({r['seconds']} s)", flush=True)
            write_tables(rows)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return 0 if all(r["status"].startswith("caught") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

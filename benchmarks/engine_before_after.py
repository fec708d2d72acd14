"""SmolLM2-135M GPTQ w4 and D²Quant w3 before and after the block engine, one process at a time.

"Before" is commit ``cebe403`` (the last one before the engine, streaming and resume landed), checked out in a
git worktree; "after" is this checkout's HEAD (or ``--after COMMIT``), in a worktree too, so editing the
checkout during the run changes nothing. Each row runs the real command under
``/usr/bin/time -v`` (wall time, peak RSS) with the same calibration (128 x 512 tokens of the bundled C4, seed
0) and ``--no-eval``; the run's own ``quantize_seconds`` (calibration capture, every block's forward and solve)
is read from its report. The checkpoints' weight files are then compared byte for byte; where they differ,
both are evaluated on the first 16 WikiText-2 test windows with the same (the "after" commit's) ``quantize eval``.

Rows already measured are skipped (resumable). Results: ``benchmarks/results/engine_before_after.{json,md}``.

    python benchmarks/engine_before_after.py [--work ~/lowbit-ba]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEFORE = "cebe403"
RUNS = {
    "gptq-w4": ["--method", "gptq", "--bits", "4"],
    "d2quant-w3": ["--method", "d2quant", "--bits", "3"],
}
COMMON = ["--group-size", "128", "--calib", "c4", "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--no-eval",
          "--overwrite"]  # fmt: skip


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"exit": r.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(int(rss.group(1)) / 2**20, 3) if rss else None,
            "tail": text.strip().splitlines()[-40:] if r.returncode else []}  # fmt: skip


def weight_hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / "lowbit-ba", help="outputs and the old worktree")
    ap.add_argument("--after", default="HEAD", help="the commit measured as 'after'")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    after = _rev(args.after)
    trees = {}
    for when, commit in (("before", BEFORE), ("after", after)):
        trees[when] = args.work / f"worktree-{commit}"
        if not trees[when].exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[when]), commit], cwd=ROOT, check=True)
    out_json = RESULTS / "engine_before_after.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    q = [sys.executable, "-c", "import cli; cli.main()"]
    for run, flags in RUNS.items():
        for when, cwd in trees.items():
            row = f"{run} {when}"
            if results.get(row, {}).get("exit") == 0:
                print(f"{row}: measured already ({results[row]['wall_s']} s)")
                continue
            out = args.work / f"{run}-{when}"
            print(f"{row}: quantize model {' '.join(flags)} ...", flush=True)
            log = args.work / f"{row.replace(' ', '-')}.log"
            r = timed([*q, "model", *flags, *COMMON, "--out", str(out)], cwd, log)
            if r["exit"] == 0:
                report = json.loads((out / "quant_report.json").read_text())
                r["quantize_seconds"] = report["quantize_seconds"]
                r["bits_per_weight"] = report["sizes"]["bits_per_weight"]
                r["weights_sha256"] = weight_hashes(out)
            r["commit"] = BEFORE if when == "before" else after
            results[row] = r
            print(json.dumps({k: v for k, v in r.items() if k not in ("tail", "weights_sha256")}), flush=True)
            out_json.write_text(json.dumps(results, indent=2))
        b, a = results.get(f"{run} before"), results.get(f"{run} after")
        if not (b and a and b["exit"] == 0 and a["exit"] == 0):
            continue
        same = b["weights_sha256"] == a["weights_sha256"]
        results[f"{run} same bytes"] = same
        if not same and "ppl16" not in a:
            for row, rec in ((f"{run} before", b), (f"{run} after", a)):
                folder = args.work / row.replace(" ", "-")
                cmd = [*q, "eval", str(folder), "--max-windows", "16", "--no-stream"]
                res = subprocess.run(cmd, cwd=trees["after"], capture_output=True, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
                rec["ppl16"] = json.loads(res.stdout)["ppl"] if res.returncode == 0 else None
        out_json.write_text(json.dumps(results, indent=2))
    write_md(results)


def _rev(commit: str) -> str:
    r = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True, check=True)
    return r.stdout.strip()


def write_md(results: dict) -> None:
    lines = [
        "# SmolLM2-135M before and after the block engine (benchmarks/engine_before_after.py)",
        "",
        f"Before: commit {BEFORE}. Same calibration (128 x 512 C4 tokens, seed 0), group 128, `--no-eval`, one "
        "process at a time on this machine (2 cores, 24 GiB, no GPU). `quantize s`: the run's own pipeline time; "
        "wall and peak RSS from `/usr/bin/time -v`.",
        "",
        "| run | commit | wall s | quantize s | peak RSS GiB | bits/weight | same bytes as before | ppl, 16 windows |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for run in RUNS:
        for when in ("before", "after"):
            r = results.get(f"{run} {when}")
            if not r:
                continue
            same = results.get(f"{run} same bytes", "")
            ppl = r.get("ppl16")
            lines.append(f"| {run} {when} | {r['commit']} | {r['wall_s']} | {r.get('quantize_seconds', '')} | "
                         f"{r['peak_rss_gib']} | {r.get('bits_per_weight', '')} | {same if when == 'after' else ''} | "
                         f"{'' if ppl is None else f'{ppl:.3f}'} |")
    (RESULTS / "engine_before_after.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

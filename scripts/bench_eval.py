#!/usr/bin/env python
"""Wall time of one ``alignez eval`` run with this checkout against an older commit, same machine,
same command (issue 12: "evaluation in minutes").

    python scripts/bench_eval.py --before 2fcb4b8 --prompts FILE [--max-tokens 160] [--threads N]
        [--vector vectors/smollm2-135m-instruct/helpful.gguf:0.5] [--out DIR] [--json]

The older commit is checked out into a git worktree beside this one (``../alignez-eval-<commit>``,
made once) and run with this checkout's Python environment; both runs use the same vector file
(from this checkout) and strength. The runs alternate (before, after) so a change in machine load
hits both. Each run's stage times come from its own report.json (``timing``). 2fcb4b8 is the first
commit whose ``eval`` runs a vector to the end (a2baa4c, before it, fails on an import) and the last
before the two main savings: judge prompts sharing one decoded prefix (2013c74) and unsteered
perplexity taken from the generation itself (c3f0075). Identical answers were already judged once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(commit: str) -> Path:
    """Return a checkout of ``commit`` beside this one, making it the first time."""
    path = ROOT.parent / f"alignez-eval-{commit}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                       capture_output=True)
    return path


def run_eval(code: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Run ``alignez eval`` from the package in ``code``; return its stage times and the wall time."""
    path, _, strength = args.vector.rpartition(":") if ":" in args.vector else (args.vector, "", "")
    vector = str((ROOT / path).resolve()) + (f":{strength}" if strength else "")  # both runs read this checkout's file
    cmd = [sys.executable, "-m", "alignez_local", "eval", "--vector", vector,
           "--prompts", str(Path(args.prompts).resolve()), "--max-tokens", str(args.max_tokens), "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=code, check=True, capture_output=True, text=True)
    wall = time.monotonic() - t0
    timing = json.loads((out / "report.json").read_text()).get("timing", {})
    return {**{k: float(v) for k, v in timing.items()}, "wall_s": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="2fcb4b8", help="the older commit [%(default)s]")
    ap.add_argument("--prompts", required=True, help="evaluation prompts (one per line)")
    ap.add_argument("--vector", default="vectors/smollm2-135m-instruct/helpful.gguf:0.5", help="[%(default)s]")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep the two eval folders (before/, after/) here [a temporary folder]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    old = worktree(args.before)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.out) if args.out else Path(tmp)  # --out keeps both reports to compare verdicts
        before = run_eval(old, args, where / "before")
        print(f"before ({args.before}): {before}", file=sys.stderr, flush=True)
        after = run_eval(ROOT, args, where / "after")
        print(f"after: {after}", file=sys.stderr, flush=True)
    out = {"before_commit": args.before, "before": before, "after": after,
           "wall_ratio": round(after["wall_s"] / before["wall_s"], 3), "threads": args.threads, "max_tokens": args.max_tokens}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

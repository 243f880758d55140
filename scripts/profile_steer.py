"""Where `alignez steer`'s time goes, by stage and by kind of work: llama.cpp decoding answers it
samples, decoding text it only reads (answer likelihoods, captured states, next-token logits), and
Python/numpy around them.

    .venv/bin/pip install py-spy                       # a sampling profiler; not a dependency
    .venv/bin/python scripts/profile_steer.py [-- steer flags]      # runs alignez steer under py-spy
    .venv/bin/python scripts/profile_steer.py --raw steer.prof.txt  # only read a recorded profile

py-spy samples the Python main thread 25 times a second; a sample whose innermost frame is the
scheduler's call into llama_decode counts as decoding, attributed to what asked for it (generate,
continuation_logprobs, capture, next_token_logits). Shares of samples, not seconds: they hold on a
busy machine too, where the wall time does not.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The outermost function of each stage (first match wins: calibration runs inside no other stage).
STAGES = [("choose_strengths", "calibrate"), ("approximation_report", "export (KL report)"), ("fit_with_difference", "fit"),
          ("generate_preferences", "generate pairs"), ("behaviour_bench", "screen"), ("screen", "screen"),
          ("_load_model", "load model")]
DECODE = "Scheduler._decode"


def stage(frames: list[str]) -> str:
    joined = " ".join(frames)
    return next((name for key, name in STAGES if key in joined), "other")


def kind(frames: list[str]) -> str:
    if DECODE not in frames[-1]:
        return "python / numpy"
    joined = " ".join(frames)
    for key, name in (("continuation_logprobs", "decode: read answers (NLL)"), ("Engine.capture", "decode: capture states"),
                      ("read_alone", "decode: capture states"), ("next_token_logits", "decode: next-token logits")):
        if key in joined:
            return name
    return "decode: generate (prefill + sampled)" if "generate" in joined.lower() else "decode: other"


def table(raw: Path) -> str:
    """Return the stage x kind table of a py-spy ``--format raw`` profile."""
    rows = []
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        rows.append(([re.sub(r" \(.*\)$", "", f) for f in stack.split(";")], int(n)))
    total = sum(n for _, n in rows) or 1
    by_stage: collections.Counter[str] = collections.Counter()
    cell: collections.Counter[tuple[str, str]] = collections.Counter()
    for frames, n in rows:
        by_stage[stage(frames)] += n
        cell[(stage(frames), kind(frames))] += n
    out = [f"{total} samples"]
    for st, v in by_stage.most_common():
        out.append(f"{st:<24} {100 * v / total:5.1f}%")
        out += [f"    {k:<38} {100 * c / total:5.1f}%" for (s, k), c in cell.most_common() if s == st and c / total >= 0.002]
    decode = sum(c for (_, k), c in cell.items() if k.startswith("decode"))
    out.append(f"llama.cpp decoding {100 * decode / total:.1f}%, Python/numpy {100 * (total - decode) / total:.1f}%")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", default=None, metavar="FILE", help="Read this recorded profile instead of running steer.")
    ap.add_argument("extra", nargs="*", help="alignez steer flags, after --")
    args = ap.parse_args()
    if args.raw:
        print(table(Path(args.raw)))
        return
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "steer.prof.txt"
        cmd = [str(spy), "record", "-r", "25", "-f", "raw", "-o", str(raw), "--", sys.executable, "-m", "alignez_local",
               "steer", "-o", str(Path(tmp) / "run"), *args.extra]
        if subprocess.run(cmd).returncode != 0:
            sys.exit("steer failed under py-spy")
        print(table(raw))


if __name__ == "__main__":
    main()

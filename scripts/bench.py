#!/usr/bin/env python
"""Whole-package benchmark (issue 6 item 3), measured side by side in one run on the default model.

(a) activation capture against llama.cpp's own decode of the same tokens: every layer's ``l_out``
    and every layer's ``ffn_out`` (the profile's default site), over ``next_token_logits``;
(b) steered against unsteered generation speed, per generated token, 8 parallel sequences: the
    additive control vector, the exact AlignEZ edit as an eval-callback hook on 5 layers, and the
    exact edit the way users run it (``Steering.generate`` with a profile: the planning capture plus
    the hook on each prompt's top-5 layers; the profile is synthetic, random orthonormal 3-direction
    subspaces on every layer, since its values do not change the cost);
(c) the whole ``alignez steer`` pipeline as a subprocess (``--limit`` queries, default 8): wall time
    and peak memory (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, the largest child so far).
    Skipped with ``--skip-steer`` or when the installed CLI has no ``steer`` command.

(a) and (b) reuse ``bench_engine.py``: conditions interleaved per repetition (rotating order), each
ratio the median of the per-repetition ratios. Prints a table; ``--json`` prints one JSON object on
stdout and the table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_engine as be

from alignez_local.llama.engine import Engine, Sampling
from alignez_local.models import DEFAULT_MODEL, resolve_model
from alignez_local.formats.profile import SteeringProfile
from alignez_local.align.steering import ProfileSlot, Steering


def synthetic_profile(engine: Engine, k: int = 3, seed: int = 0) -> SteeringProfile:
    """Return a profile with random orthonormal ``k``-direction subspaces on every layer (for timing)."""
    rng = np.random.default_rng(seed)
    subs = {}
    for layer in range(engine.n_layer):
        q, _ = np.linalg.qr(rng.standard_normal((engine.n_embd, k)))
        subs[layer] = q.T.astype(np.float32)
    return SteeringProfile(
        subspaces=subs, site="ffn_out", method="svd", axis={"name": "bench", "positive": "p", "negative": "n"},
        layer_stats={}, params={}, provenance={"n_embd": engine.n_embd, "n_layer": engine.n_layer, "arch": engine.arch},
        name="bench",
    )


def measure_profile_steering(engine: Engine, reps: int, max_tokens: int) -> dict[str, Any]:
    """Return per-token time of ``Steering.generate`` with a profile (planning + hook) over unsteered."""
    ps = be.prompts(engine)
    sp = Sampling(max_tokens=max_tokens)
    st = Steering(profiles=[ProfileSlot("bench", synthetic_profile(engine), 1.0)], top_n=5)
    res = be.interleaved({
        "unsteered": lambda: engine.generate(ps, sp),
        "profile": lambda: st.generate(engine, ps, sp),
    }, reps)
    per_tok = {n: [t / max(1, be.gen_tokens(c)) for t, c in rows] for n, rows in res.items()}
    return {
        "ratio": be.median_ratio(per_tok["profile"], per_tok["unsteered"]),
        "ms_per_token_median": {n: 1000 * statistics.median(v) for n, v in per_tok.items()},
        "top_n": 5, "directions_per_layer": 3,
    }


def alignez_command() -> list[str]:
    """Return the command that runs the ``alignez`` CLI (the console script, else this Python)."""
    exe = shutil.which("alignez")
    return [exe] if exe else [sys.executable, "-c", "from alignez_local.apps.cli import main; main()"]


def measure_steer(model: str, limit: int | None, threads: int | None) -> dict[str, Any]:
    """Return wall time, peak RSS and outcome of one ``alignez steer`` run in a subprocess
    (``limit`` None: steer's own default query count)."""
    cmd = alignez_command()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="bench-steer-") as tmp:
        args = [*cmd, "steer", "-m", model, "-o", str(Path(tmp) / "out")]
        if limit:
            args += ["--limit", str(limit)]
        if threads:
            args += ["--threads", str(threads)]
        t0 = time.perf_counter()
        r = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        files = sorted(p.name for p in (Path(tmp) / "out").glob("*")) if (Path(tmp) / "out").is_dir() else []
    out: dict[str, Any] = {"command": " ".join(["alignez", *args[len(cmd):]]), "limit": limit, "returncode": r.returncode,
                           "wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024, 1), "files": files}
    if r.returncode != 0:
        out["error"] = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Return the exit code after running (a), (b), (c) and printing the table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=DEFAULT_MODEL, help="GGUF file or bundled name [%(default)s]")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per condition [%(default)s]")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads [physical cores]")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens generated per sequence [%(default)s]")
    ap.add_argument("--skip-steer", action="store_true", help="skip (c), the alignez steer pipeline")
    ap.add_argument("--steer-limit", type=int, default=None, help="queries for (c) [steer's default, 96]")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    engine = Engine(resolve_model(args.model), n_ctx=4096, n_parallel=8, n_threads=args.threads)
    cap_l = be.measure_capture(engine, args.reps, site="l_out")
    cap_f = be.measure_capture(engine, args.reps, site="ffn_out")
    steer = be.measure_steering(engine, args.reps, args.max_tokens)
    prof = measure_profile_steering(engine, args.reps, args.max_tokens)
    name, n_layer, n_threads = engine.name, engine.n_layer, engine.n_threads
    engine.close()  # before (c): the pipeline's peak memory is measured alone
    pipeline = {"skipped": "--skip-steer"} if args.skip_steer else measure_steer(args.model, args.steer_limit, args.threads)

    rows = [
        ("(a) capture l_out, all layers / decode", f"{cap_l['ratio']:.3f}x", f"{cap_l['tokens']} tokens"),
        ("(a) capture ffn_out, all layers / decode", f"{cap_f['ratio']:.3f}x", f"prefill {cap_l['prefill_tokens_per_s']:.0f} tok/s"),
        ("(b) additive control vector / unsteered", f"{steer['additive']:.3f}x",
         f"{steer['ms_per_token_median']['unsteered']:.1f} ms/token unsteered, 8 seqs"),
        (f"(b) exact edit hook, {len(steer['hook_layers'])} layers / unsteered", f"{steer['hook']:.3f}x", f"{steer['hook_directions']} directions per layer"),
        ("(b) exact edit via Steering (plan+hook)", f"{prof['ratio']:.3f}x", "profile on all layers, top 5"),
    ]
    if "skipped" in pipeline:
        rows.append(("(c) alignez steer", "skipped", pipeline["skipped"]))
    else:
        ok = "ok" if pipeline["returncode"] == 0 else f"FAILED: {pipeline.get('error', '')}"
        rows.append((f"(c) alignez steer{' --limit ' + str(pipeline['limit']) if pipeline['limit'] else ''}", f"{pipeline['wall_s']:.0f} s",
                     f"peak RSS {pipeline['peak_rss_mb']:.0f} MB, {ok}"))
    width = max(len(r[0]) for r in rows)
    text = "\n".join([f"{name}: {n_layer} layers, {n_threads} threads, {args.reps} interleaved reps (median of ratios)",
                      f"{'measure':<{width}}  {'value':>9}  notes", "-" * (width + 40)]
                     + [f"{a:<{width}}  {b:>9}  {c}" for a, b, c in rows])
    out = {
        "model": name, "n_layer": n_layer, "threads": n_threads, "reps": args.reps,
        "capture_l_out_over_decode": cap_l["ratio"], "capture_ffn_out_over_decode": cap_f["ratio"],
        "additive_over_unsteered": steer["additive"], "hook_over_unsteered": steer["hook"],
        "profile_steering_over_unsteered": prof["ratio"],
        "steer_pipeline": pipeline,
        "details": {"capture_l_out": cap_l, "capture_ffn_out": cap_f, "steering": steer, "profile_steering": prof},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(out))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a gated vector costs beside unsteered generation (issue 29), timed side by side in one run.

    .venv/bin/python scripts/bench_gates.py [--model qwen2.5-coder-0.5b-instruct]
        [--vector vectors/qwen2.5-coder-0.5b-instruct/harmless.gguf] [--prompts 48] [--tokens 48]
        [--threads 2] [--rounds 1] [--json OUT.json]

Answers ``--prompts`` mixed prompts (harmful and ordinary evaluation prompts, alternating), greedy,
``--tokens`` tokens each, four ways, each timed on the same engine:
- unsteered: ``Engine.generate``;
- gated, old: what ``Steering.generate`` did before issue 29: every prompt's gates read alone over
  the whole model (a full prefill per prompt), then, where the gates disagree, the whole batch
  decoded without the vector as the reference and the opened prompts again, steered
  (``generate(reference=True)`` with those decisions);
- gated, new: ``Steering.generate``: the gates read in one batch that stops at the deepest gate
  layer, the prompts a batch may have moved across a threshold read again alone, and the shut and the
  opened prompts decoded as two runs;
- ungated: the same vector without its gates on every prompt (llama.cpp's control vector).
The gate reading alone is timed too (old and new). With ``--rounds`` > 1 the runs take turns in a
rotating order each round and the medians are printed: wall seconds and this process's CPU
seconds (steadier on a shared machine), each as a ratio to unsteered, and the tokens generated (a
refusal vector's answers are shorter, which makes the steered runs cheaper: ``--strength 0.001``
keeps the answers as they are and leaves only the gates' own cost). Checks, before any timing is printed: the new
reading decides every prompt as the old one; the old and new runs give the opened prompts the same
answers, and the new run's shut prompts get exactly the unsteered run of the shut prompts.

A benchmark, not a test: the figures depend on the machine and on what else runs on it, and are
printed with the machine (CPU model, threads) and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from alignez_local.align.gate_reading import BATCH_MARGIN, BATCH_RESCALE, near_threshold, read_alone, read_gates
from alignez_local.align.steering import Steering
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.formats.gate import Gates
from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.prompt_sets import load_eval_prompts
from alignez_local.settings import RuntimeSettings, open_engine
from bench_steer import cpu_model  # scripts/ is on the path when a script runs

ROOT = Path(__file__).resolve().parents[1]


def mixed_prompts(n: int) -> list[str]:
    """Return ``n`` user prompts: harmful and ordinary (helpful) evaluation prompts, alternating."""
    harmful = [p.text for p in load_eval_prompts(kinds={"harmful"})]
    ordinary = [p.text for p in load_eval_prompts(kinds={"helpful"})]
    out = [x for pair in zip(harmful, ordinary) for x in pair][:n]
    if len(out) < n:
        sys.exit(f"only {len(out)} mixed prompts available; ask for at most that many")
    return out


def old_decisions(engine: Engine, prompts: list[str], gates: Gates) -> np.ndarray:
    """Return each prompt's gate decision read as before issue 29: alone, the whole graph computed."""
    engine.stop_captures_early = False
    try:
        alone = read_alone(engine, prompts, gates.layers)
    finally:
        engine.stop_captures_early = True
    return gates.opens({L: alone[:, j] for j, L in enumerate(gates.layers)})


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Return (wall seconds, this process's CPU seconds, result): on a shared machine the CPU
    seconds are the steadier figure (the wall clock also counts the other processes' turns)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def same_bits(a: Completion, b: Completion) -> bool:
    return a.tokens == b.tokens and np.array_equal(a.token_logprobs, b.token_logprobs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct" / "harmless.gguf"))
    ap.add_argument("--strength", type=float, default=None, help="default: the file's calibrated strength")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", default=None, metavar="OUT.json")
    a = ap.parse_args()
    cv = read_control_vector(a.vector)
    if not isinstance(cv.gate, Gates):
        sys.exit(f"{a.vector} has no gate")
    strength = cv.default_strength_or_one if a.strength is None else a.strength
    engine = open_engine(a.model, RuntimeSettings(threads=a.threads))
    prompts = [engine.prompt(u) for u in mixed_prompts(a.prompts)]
    sampling = Sampling(temperature=0.0, max_tokens=a.tokens)
    gated = Steering.vector(cv, strength)
    ungated = Steering.vector(dataclasses.replace(cv, gate=None), strength)
    load0 = os.getloadavg()

    def old() -> list[Completion]:
        opens = [frozenset({0}) if o else frozenset() for o in old_decisions(engine, prompts, cv.gate)]  # type: ignore[arg-type]
        return gated.generate(engine, prompts, sampling, reference=True, opens=opens)

    runs: dict[str, Callable[[], object]] = {
        "unsteered": lambda: engine.generate(prompts, sampling),
        "gated, old": old,
        "gated, new": lambda: gated.generate(engine, prompts, sampling),
        "ungated vector": lambda: ungated.generate(engine, prompts, sampling),
        "gates read, old": lambda: old_decisions(engine, prompts, cv.gate),  # type: ignore[arg-type]
        "gates read, new": lambda: read_gates(engine, prompts, [cv.gate])[:, 0],  # type: ignore[list-item]
    }
    names = list(runs)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    results: dict[str, object] = {}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            s, c, results[name] = timed(runs[name])
            seconds[name].append(s)
            cpu[name].append(c)
            print(f"round {r + 1}: {name} {s:.1f}s wall, {c:.1f}s CPU", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    # The checks: the new reading decides as the old, and the answers are what each promises.
    old_open, new_open = np.asarray(results["gates read, old"]), np.asarray(results["gates read, new"])
    assert np.array_equal(old_open, new_open), "the batched gate reading decided a prompt otherwise than alone"
    shut = [i for i in range(len(prompts)) if not new_open[i]]
    reference = engine.generate([prompts[i] for i in shut], sampling)
    new, before, plain = results["gated, new"], results["gated, old"], results["unsteered"]
    assert all(same_bits(new[i], c) for i, c in zip(shut, reference)), "a shut prompt's answer is not the unsteered one"  # type: ignore[index]
    assert all(same_bits(before[i], plain[i]) for i in shut), "the old way's shut answers are not the batch's unsteered ones"  # type: ignore[index]
    assert all(new[i].tokens == before[i].tokens for i in range(len(prompts)) if new_open[i])  # type: ignore[index]
    # How many prompts the new reading read again alone (within the margin of the threshold).
    together = engine.capture(list(dict.fromkeys(prompts)), cv.gate.layers, site="l_out")  # type: ignore[union-attr]
    reread = len(near_threshold({L: together[:, j] for j, L in enumerate(cv.gate.layers)}, [cv.gate]))  # type: ignore[union-attr,list-item]
    base, base_cpu = statistics.median(seconds["unsteered"]), statistics.median(cpu["unsteered"])
    print(f"{a.model}, {Path(a.vector).name} x{strength:g}: {len(prompts)} mixed prompts, {a.tokens} greedy tokens, "
          f"{a.threads} threads on {cpu_model()} ({os.cpu_count()} CPUs); load average {load0[0]:.2f} before, {load1[0]:.2f} after; "
          f"gates open on {int(new_open.sum())} of {len(prompts)}; {reread} read again alone (margin {BATCH_MARGIN:g} x |state| + {BATCH_RESCALE:g} x |projection|)")
    print(f"  {'':<16} {'wall':>8} {'ratio':>6} {'CPU':>8} {'ratio':>6}  tokens  (wall per round)")
    for name in names:
        s, c = statistics.median(seconds[name]), statistics.median(cpu[name])
        out = results[name]
        tokens = str(sum(x.n_tokens for x in out)) if isinstance(out, list) else ""  # type: ignore[attr-defined]
        print(f"  {name:<16} {s:7.1f}s {s / base:5.2f}x {c:7.1f}s {c / base_cpu:5.2f}x  {tokens:>6}  "
              f"({', '.join(f'{x:.1f}' for x in seconds[name])})")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "vector": a.vector, "strength": strength, "prompts": len(prompts),
                                            "tokens": a.tokens, "threads": a.threads, "cpu": cpu_model(), "load": [load0, load1],
                                            "opened": int(new_open.sum()), "reread": reread, "seconds": seconds, "cpu_seconds": cpu}, indent=1))


if __name__ == "__main__":
    main()

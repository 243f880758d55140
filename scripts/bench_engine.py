#!/usr/bin/env python
"""Engine overheads on SmolLM2 (issue 2 item 6), measured side by side in one run.

- ``capture_overhead``: time to capture every layer's ``l_out`` (``Engine.capture``) over the time
  llama.cpp takes to decode (prefill) the same tokens without capture (``Engine.next_token_logits``);
- ``parallel_speedup``: generated tokens/s with 8 parallel sequences over 1 (the same 8 prompts
  generated one at a time);
- ``additive_overhead``: time per generated token with a control vector on every layer over without;
- ``hook_overhead``: time per generated token with the exact AlignEZ edit (``edit.edit_delta``: relu
  removal + tanh boost, 3 unit directions per layer, per row, as ``Steering`` applies it) running
  through ``Engine.activation_edit`` on 5 layers, over unsteered.

Every condition of a measure runs once per repetition, conditions interleaved (their order rotates
every repetition) so a slow-down of the shared machine hits them all; each ratio is the median of
its per-repetition ratios. The control vector and the edit directions are tiny/arbitrary: their cost
does not depend on their size, and ratios are per generated token so changed answers cannot bias them.

With ``--batched`` it also measures llama.cpp's own ``llama-batched-bench`` (no Python in the loop:
the ceiling for parallel generation) against our engine on the same model, threads and shapes
(prompt 128, generation 128, 1/4/8/16 sequences), the two interleaved per repetition, on SmolLM2 and
Gemma 3 270M (``--batched-models``). Keys: ``parallel_tok_s``, ``llama_batched_tok_s`` and
``parallel_vs_llama_batched`` (generated tokens / wall time, prefill included, for both). The
binary comes from ``--llama-batched-bench`` or the ``LLAMA_BATCHED_BENCH`` environment variable;
build it with ``../shared/tools/build-llama-tools.sh`` (about 10 minutes on 2 cores).

``--shared-prefix`` measures ``continuation_logprobs`` on a judge-like set (one long instruction
before every answer) with the shared prefix decoded once, against re-reading it per answer.

Usage: ``python scripts/bench_engine.py [--reps 5] [--threads N] [--json] [--batched] [--shared-prefix]
[--skip-overheads]``. With ``--json`` the one JSON object goes to stdout and the table to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignez_local.align.edit import edit_delta
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.models import DEFAULT_MODEL, resolve_model

TARGETS: dict[str, tuple[str, float]] = {
    "capture_overhead": ("<=", 1.10),
    "parallel_speedup": (">=", 3.0),
    "additive_overhead": ("<=", 1.02),
    "hook_overhead": ("<=", 1.25),
}
HOOK_LAYERS = 5
HOOK_DIRECTIONS = 3

QUESTIONS = [
    "How do I keep basil alive on a windowsill?",
    "Explain what a hash table is to a new programmer.",
    "Write a short, friendly note asking a neighbour to keep the noise down after 10pm.",
    "What are the main causes of inflation?",
    "Give me three tips for a first job interview.",
    "How does a bicycle stay upright when it moves?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "What should I pack for a two-day hike in autumn?",
]
# A fixed answer body makes every capture/prefill text a realistic ~150 tokens.
BODY = (
    "Here is a clear and practical answer. First, consider the main constraints and what matters most "
    "in your situation. Second, start with the simplest approach that works, check the result, and adjust "
    "step by step. Third, keep notes of what you tried so you can repeat what worked. Finally, ask someone "
    "with experience if you get stuck; most problems have been solved before, and a short conversation "
    "often saves hours of trial and error."
)


def prompts(engine: Engine) -> list[str]:
    """Return the 8 chat-formatted prompts used for generation."""
    return [engine.prompt(q) for q in QUESTIONS]


def capture_texts(engine: Engine) -> list[str]:
    """Return the 8 prompt+answer texts used for capture and prefill."""
    return [engine.prompt(q) + BODY for q in QUESTIONS]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Return (wall seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(conditions: dict[str, Callable[[], Any]], reps: int, warmup: bool = True) -> dict[str, list[tuple[float, Any]]]:
    """Return per condition the (seconds, result) of every repetition, conditions interleaved.

    The order rotates each repetition so none always runs first (caches warm, turbo, neighbours).
    """
    names = list(conditions)
    if warmup:
        for name in names:
            conditions[name]()
    res: dict[str, list[tuple[float, Any]]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            res[name].append(timed(conditions[name]))
    return res


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Return the median of the per-repetition ratios num[i] / den[i]."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def gen_tokens(comps: Sequence[Any]) -> int:
    """Return the number of generated tokens of a list of completions."""
    return sum(c.n_tokens for c in comps)


def measure_capture(engine: Engine, reps: int, site: str = "l_out") -> dict[str, Any]:
    """Return capture-vs-prefill timings: every layer's ``site`` captured, against a plain decode."""
    texts = capture_texts(engine)
    layers = list(range(engine.n_layer))
    res = interleaved({
        "decode": lambda: engine.next_token_logits(texts),
        "capture": lambda: engine.capture(texts, layers, site=site),
    }, reps)
    dec, cap = [t for t, _ in res["decode"]], [t for t, _ in res["capture"]]
    n_tok = sum(len(engine.tokenize(t)) for t in texts)
    return {
        "ratio": median_ratio(cap, dec),
        "site": site, "layers": len(layers), "texts": len(texts), "tokens": n_tok,
        "decode_s_median": statistics.median(dec), "capture_s_median": statistics.median(cap),
        "prefill_tokens_per_s": n_tok / statistics.median(dec),
    }


def measure_parallel(engine: Engine, reps: int, max_tokens: int) -> dict[str, Any]:
    """Return generated tokens/s with all 8 prompts as parallel sequences over one at a time."""
    ps = prompts(engine)
    sp = Sampling(max_tokens=max_tokens)
    res = interleaved({
        "parallel": lambda: engine.generate(ps, sp),
        "serial": lambda: [c for p in ps for c in engine.generate([p], sp)],
    }, reps)
    par = [gen_tokens(c) / t for t, c in res["parallel"]]
    ser = [gen_tokens(c) / t for t, c in res["serial"]]
    return {
        "ratio": median_ratio(par, ser), "sequences": len(ps), "max_tokens": max_tokens,
        "parallel_tokens_per_s_median": statistics.median(par), "serial_tokens_per_s_median": statistics.median(ser),
    }


def random_control_vector(engine: Engine, scale: float = 0.01, seed: int = 0) -> dict[int, np.ndarray]:
    """Return a small random direction for every steerable layer (1..n_layer-1)."""
    rng = np.random.default_rng(seed)
    return {layer: (rng.standard_normal(engine.n_embd) * scale).astype(np.float32) for layer in range(1, engine.n_layer)}


def exact_edit(engine: Engine, n_layers: int = HOOK_LAYERS, k: int = HOOK_DIRECTIONS, seed: int = 0) -> tuple[Callable[..., Any], list[int]]:
    """Return (edit function, layers): the AlignEZ rule on ``n_layers`` middle layers, ``k`` directions each,
    applied row by row as ``Steering``'s profile edit does."""
    rng = np.random.default_rng(seed)
    n_layers = min(n_layers, engine.n_layer)
    first = max(0, engine.n_layer // 2 - n_layers // 2)
    layers = list(range(first, min(engine.n_layer, first + n_layers)))
    dirs = {}
    for layer in layers:
        q, _ = np.linalg.qr(rng.standard_normal((engine.n_embd, k)))
        dirs[layer] = q.T.astype(np.float32)  # k orthonormal unit rows

    def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray:
        """Return the rows with the AlignEZ edit applied, one row (sequence) at a time."""
        delta = np.zeros_like(x)
        for row in range(len(keys)):
            delta[row] += edit_delta(x[row], dirs[layer])
        return x + delta

    return edit, layers


def measure_steering(engine: Engine, reps: int, max_tokens: int) -> dict[str, Any]:
    """Return per-token generation time with a control vector and with the exact edit, over unsteered."""
    ps = prompts(engine)
    sp = Sampling(max_tokens=max_tokens)
    vec = random_control_vector(engine)
    fn, layers = exact_edit(engine)

    def with_vector() -> Any:
        """Return the completions generated with the control vector on."""
        with engine.control_vector(vec):
            return engine.generate(ps, sp)

    def with_hook() -> Any:
        """Return the completions generated with the exact edit hooked in."""
        with engine.activation_edit(fn, layers, site="ffn_out"):
            return engine.generate(ps, sp)

    res = interleaved({"unsteered": lambda: engine.generate(ps, sp), "vector": with_vector, "hook": with_hook}, reps)
    per_tok = {n: [t / max(1, gen_tokens(c)) for t, c in rows] for n, rows in res.items()}
    return {
        "additive": median_ratio(per_tok["vector"], per_tok["unsteered"]),
        "hook": median_ratio(per_tok["hook"], per_tok["unsteered"]),
        "hook_layers": layers, "hook_directions": HOOK_DIRECTIONS, "sequences": len(ps), "max_tokens": max_tokens,
        "ms_per_token_median": {n: 1000 * statistics.median(v) for n, v in per_tok.items()},
        "tokens": {n: [gen_tokens(c) for _, c in rows] for n, rows in res.items()},
    }


BATCHED_SHAPES = (1, 4, 8, 16)
PROMPT_TOKENS = 128
GEN_TOKENS = 128
JUDGE_INSTRUCTION = (
    "You are a careful judge. Read the question and the answer below. Rate the answer from 1 to 10 for "
    "helpfulness: does it address the question, is it correct, is it clear and complete, and does it avoid "
    "padding? Then rate it from 1 to 10 for harmlessness: does it avoid dangerous, deceptive or hurtful "
    "content? Reply with the two numbers only, as 'helpful: N, harmless: M'.\n\n"
)


def find_batched_bench(flag: str | None) -> str:
    """Return the llama-batched-bench path from the flag, $LLAMA_BATCHED_BENCH or PATH, or exit saying how to build it."""
    path = flag or os.environ.get("LLAMA_BATCHED_BENCH") or shutil.which("llama-batched-bench")
    if not path or not os.access(path, os.X_OK):
        sys.exit("llama-batched-bench not found: give --llama-batched-bench PATH or set LLAMA_BATCHED_BENCH; build it "
                 "with `LLAMA_TOOLS=../llama-tools ../shared/tools/build-llama-tools.sh` from the project root "
                 "(about 10 minutes on 2 cores; it links the project's own llama.cpp libraries)")
    return path


def run_batched_bench(binary: str, model: Path, threads: int, shapes: Sequence[int]) -> dict[int, dict[str, float]]:
    """Return llama-batched-bench's results per parallel count, with our engine's settings (unified KV,
    n_batch = n_ubatch = 512, flash attention off)."""
    n_ctx = max(shapes) * (PROMPT_TOKENS + GEN_TOKENS)
    cmd = [binary, "-m", str(model), "-c", str(n_ctx), "-b", "512", "-ub", "512", "-t", str(threads), "-tb", str(threads),
           "-npp", str(PROMPT_TOKENS), "-ntg", str(GEN_TOKENS), "-npl", ",".join(map(str, shapes)), "-kvu",
           "-fa", "off", "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out: dict[int, dict[str, float]] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("{") and '"pl"' in line:
            rec = json.loads(line)
            out[int(rec["pl"])] = rec
    return out


def exact_prompt(engine: Engine, n_tokens: int, seed: int) -> str:
    """Return a plain-text prompt of exactly ``n_tokens`` tokens (BOS included), varied by ``seed``."""
    words = QUESTIONS[seed % len(QUESTIONS)] + " " + BODY * 4
    toks = engine.tokenize(words)
    k = n_tokens
    for _ in range(20):
        text = engine.detokenize(toks[:k])
        got = len(engine.tokenize(text))
        if got == n_tokens:
            return text
        k += n_tokens - got
    raise RuntimeError("could not build a prompt of the exact length")


def measure_batched(model_name: str, binary: str, threads: int | None, reps: int) -> dict[str, Any]:
    """Return our tok/s and llama-batched-bench's at each parallel count, interleaved per repetition."""
    path = resolve_model(model_name)
    engine = Engine(path, n_ctx=max(BATCHED_SHAPES) * (PROMPT_TOKENS + GEN_TOKENS), n_parallel=max(BATCHED_SHAPES),
                    n_threads=threads)
    prompts = [exact_prompt(engine, PROMPT_TOKENS, i) for i in range(max(BATCHED_SHAPES))]
    sp = Sampling(max_tokens=GEN_TOKENS)
    ours: dict[int, list[float]] = {n: [] for n in BATCHED_SHAPES}
    theirs: dict[int, list[float]] = {n: [] for n in BATCHED_SHAPES}
    for _ in range(reps):
        for n, rec in run_batched_bench(binary, path, engine.n_threads, BATCHED_SHAPES).items():
            theirs[n].append(n * GEN_TOKENS / rec["t"])
        for n in BATCHED_SHAPES:
            t, comps = timed(lambda: engine.generate(prompts[:n], sp))
            ours[n].append(gen_tokens(comps) / t)
    engine.close()
    med = {n: statistics.median(v) for n, v in ours.items()}
    ref = {n: statistics.median(v) for n, v in theirs.items() if v}
    return {
        "model": model_name, "threads": engine.n_threads, "prompt_tokens": PROMPT_TOKENS, "gen_tokens": GEN_TOKENS,
        "parallel_tok_s": {str(n): round(v, 1) for n, v in med.items()},
        "llama_batched_tok_s": {str(n): round(v, 1) for n, v in ref.items()},
        "parallel_vs_llama_batched": {str(n): round(med[n] / ref[n], 3) for n in ref},
    }


def measure_shared_prefix(engine: Engine, reps: int, n_answers: int = 16) -> dict[str, Any]:
    """Return continuation_logprobs time on a judge-like set with the shared prefix on and off."""
    prompts = [engine.prompt(JUDGE_INSTRUCTION + f"Question: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:") for i in range(n_answers)]
    answers = [" " + BODY[: 120 + 20 * (i % 5)] for i in range(n_answers)]

    def run(share: bool) -> Any:
        engine.share_prefix = share
        try:
            return engine.continuation_logprobs(prompts, answers)
        finally:
            engine.share_prefix = True

    res = interleaved({"shared": lambda: run(True), "unshared": lambda: run(False)}, reps)
    sh, un = [t for t, _ in res["shared"]], [t for t, _ in res["unshared"]]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(res["shared"][0][1], res["unshared"][0][1]))
    return {"ratio": median_ratio(sh, un), "shared_s_median": statistics.median(sh), "unshared_s_median": statistics.median(un),
            "answers": n_answers, "prompt_tokens": len(engine.tokenize(prompts[0])), "max_abs_diff_nats": diff}


def verdict(name: str, value: float) -> str:
    """Return "met" or "not met" for a metric against its target."""
    op, target = TARGETS[name]
    ok = value <= target if op == "<=" else value >= target
    return "met" if ok else "not met"


def table(rows: Sequence[tuple[str, float, str, str]]) -> str:
    """Return a plain-text table of (metric, value, target, verdict)."""
    lines = [f"{'metric':<20} {'value':>8}  {'target':<8} verdict", "-" * 48]
    lines += [f"{n:<20} {v:>8.3f}  {t:<8} {m}" for n, v, t, m in rows]
    return "\n".join(lines)


def measure_overheads(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Return the four overhead ratios (JSON part) and their table text."""
    engine = Engine(resolve_model(args.model), n_ctx=4096, n_parallel=8, n_threads=args.threads)
    cap = measure_capture(engine, args.reps)
    par = measure_parallel(engine, args.reps, args.max_tokens)
    steer = measure_steering(engine, args.reps, args.max_tokens)
    values = {
        "capture_overhead": cap["ratio"],
        "parallel_speedup": par["ratio"],
        "additive_overhead": steer["additive"],
        "hook_overhead": steer["hook"],
    }
    rows = [(n, v, f"{TARGETS[n][0]} {TARGETS[n][1]:g}", verdict(n, v)) for n, v in values.items()]
    out = {
        **values,
        "targets": {n: f"{op} {t:g}" for n, (op, t) in TARGETS.items()},
        "met": {n: verdict(n, v) == "met" for n, v in values.items()},
        "model": engine.name, "n_layer": engine.n_layer, "threads": engine.n_threads, "reps": args.reps,
        "details": {"capture": cap, "parallel": par, "steering": steer},
    }
    text = (f"{engine.name}: {engine.n_layer} layers, {engine.n_threads} threads, {args.reps} interleaved reps, "
            f"median of per-rep ratios\n" + table(rows)
            + f"\ncapture: {cap['tokens']} tokens, prefill {cap['prefill_tokens_per_s']:.0f} tok/s; "
            f"generation: {par['parallel_tokens_per_s_median']:.1f} tok/s x8 vs {par['serial_tokens_per_s_median']:.1f} tok/s x1")
    engine.close()
    return out, text


def main(argv: Sequence[str] | None = None) -> int:
    """Return the exit code after measuring and printing the table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=DEFAULT_MODEL, help="GGUF file or bundled name [%(default)s]")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per condition [%(default)s]")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads [physical cores]")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens generated per sequence [%(default)s]")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    ap.add_argument("--skip-overheads", action="store_true", help="leave out the four overhead ratios")
    ap.add_argument("--batched", action="store_true", help="compare with llama-batched-bench")
    ap.add_argument("--batched-models", default="smollm2-135m-instruct,gemma3-270m", help="[%(default)s]")
    ap.add_argument("--llama-batched-bench", default=None, help="path [$LLAMA_BATCHED_BENCH]")
    ap.add_argument("--shared-prefix", action="store_true", help="measure the judge-like shared prefix saving")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    texts: list[str] = []
    if not args.skip_overheads:
        part, text = measure_overheads(args)
        out.update(part)
        texts.append(text)
    if args.batched:
        binary = find_batched_bench(args.llama_batched_bench)
        models = args.batched_models.split(",")
        for m in models:  # a missing model fails now, not after an hour of measuring the others
            try:
                resolve_model(m)
            except AlignezError as err:
                sys.exit(f"error: {err}")
        out["batched"] = []
        for m in models:
            b = measure_batched(m, binary, args.threads, args.reps)
            out["batched"].append(b)
            texts.append(f"{b['model']} ({b['threads']} threads): ours {b['parallel_tok_s']} llama {b['llama_batched_tok_s']} "
                         f"ratio {b['parallel_vs_llama_batched']}")
            print(texts[-1], file=sys.stderr, flush=True)  # each model's figures as soon as they exist
    if args.shared_prefix:
        engine = Engine(resolve_model(args.model), n_ctx=4096, n_parallel=8, n_threads=args.threads)
        out["shared_prefix"] = sp = measure_shared_prefix(engine, args.reps)
        engine.close()
        texts.append(f"shared prefix: {sp['shared_s_median']:.2f} s vs {sp['unshared_s_median']:.2f} s "
                     f"(ratio {sp['ratio']:.3f}, max diff {sp['max_abs_diff_nats']:.2e} nats)")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    text = "\n".join(texts)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(out))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

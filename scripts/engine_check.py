"""Does an exported vector steer Hugging Face transformers as it steers llama.cpp? (issue 30,
docs/engines.md)

Loads one GGUF model twice: in llama.cpp (our Engine, the file's own quantized weights) and in
transformers (dequantized to float32). Exports the vector for each tool (``alignez export --to``),
applies each file with a forward hook where that tool adds it (alignez_local/testing/hf_steering.py),
and prints:

(a) per layer, the residual stream leaving each block on a few prompts (last token and token mean):
    the unsteered gap between the two engines, and the steered-minus-unsteered difference in
    transformers against llama.cpp's (relative error); a deliberately wrong convention (IBM's file
    read one block late) shows what a one-layer mistake looks like;
(b) answers in the behaviour's language on the held-out report queries ``steer`` reports on
    (greedy, 40 tokens, repetition penalty 1.1), unsteered and through each tool's file, beside
    llama.cpp's own steered answers.

Needs torch and transformers (pip install torch transformers; not dependencies of the package).
Pin it: taskset -c 0 .venv/bin/python scripts/engine_check.py --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from alignez_local.align.behaviour_bench import ANSWER_TOKENS, CHOOSE_QUERIES, REPORT_QUERIES, SAMPLING, split_heldout
from alignez_local.align.preferences import load_pairs
from alignez_local.align.steering import Steering
from alignez_local.api import load
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.formats.engines import ENGINES, write_for_engine
from alignez_local.measures.behaviour import measure_for
from alignez_local.models import resolve_model
from alignez_local.prompt_sets import heldout_queries
from alignez_local.testing.hf_steering import HOOKS, greedy, load_hf, steered, streams

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct" / "french.gguf"
PROMPTS = ["How can I stay focused while studying for exams?", "What is a good way to start running?",
           "Explain what a hash table is."]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def report_queries(vector: Path) -> list[str]:
    """The held-out report half steer used: built-in queries not in the vector's pairs, split as steer splits them."""
    used = list(dict.fromkeys(p.query for p in load_pairs(vector.parent / f"{vector.stem}.preferences.jsonl")))
    axis = str(read_control_vector(vector).metadata.get("alignez.axis"))
    _, report = split_heldout([q for q in heldout_queries(axis, used) if q not in set(used)], CHOOSE_QUERIES, REPORT_QUERIES)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vector", type=Path, default=VECTOR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tools", default="repeng,easysteer,ibm,steering-vectors,ibm-as-output",
                    help="Hook conventions for (a); (b) runs the first three distinct hook points.")
    ap.add_argument("--behaviour-tools", default="repeng,ibm,steering-vectors")
    ap.add_argument("--no-behaviour", action="store_true", help="Skip (b).")
    args = ap.parse_args()
    t0 = time.time()
    cv = read_control_vector(args.vector)
    s = cv.default_strength_or_one
    path = resolve_model(args.model)
    engine = load(path, threads=args.threads)
    model = load_hf(path, threads=args.threads)
    print(f"model {path.name}: llama.cpp {engine.n_layer} layers; transformers {type(model).__name__} float32; "
          f"vector {args.vector.name} layers {cv.layers} at strength {s:g} (folded into each exported file)")
    tmp = Path(tempfile.mkdtemp(prefix="engine-check-"))
    files = {}
    for tool in ENGINES:
        done = write_for_engine(cv, tool, tmp / f"v-{tool}{ENGINES[tool].suffix}")
        files[tool] = done.path
        print(f"  {done.lines()[0]}")
    files["ibm-as-output"] = files["ibm"]
    tools = [t for t in args.tools.split(",") if t]

    # (a) hidden states
    prompts = [engine.prompt(q) for q in PROMPTS]
    layers = list(range(engine.n_layer))
    ll_plain = np.stack([engine.capture(prompts, layers, site="l_out", reduce=r) for r in ("last", "mean")], 2)
    with Steering.vector(cv, s).applied(engine, prompts):
        ll_steer = np.stack([engine.capture(prompts, layers, site="l_out", reduce=r) for r in ("last", "mean")], 2)
    ids = [engine.tokenize(p) for p in prompts]
    hf_plain = np.stack([streams(model, t) for t in ids])
    first, last = cv.layers[0], engine.n_layer - 1
    gap = [max(rel(hf_plain[i, L, r], ll_plain[i, L, r]) for i in range(len(ids)) for r in (0, 1)) for L in layers]
    print(f"\n(a) residual stream leaving each block, {len(ids)} prompts x (last token, token mean); "
          f"relative error ||x - llama|| / ||llama||, worst over prompts and both rows")
    print(f"  unsteered transformers (float32, dequantized) vs llama.cpp (the file's own weights): layer {first} {gap[first]:.3f}, "
          f"layer {last} {gap[last]:.3f}, worst {max(gap):.3f} (layer {int(np.argmax(gap))})")
    d_ll = ll_steer - ll_plain
    print(f"  steering's own change in llama.cpp: ||d|| at layer {first} = {np.linalg.norm(d_ll[0, first, 0]):.3f} "
          f"(= strength x ||direction.{first}|| = {s * np.linalg.norm(cv.directions[first]):.3f}), "
          f"at layer {last} = {np.linalg.norm(d_ll[0, last, 0]):.2f}")
    steered_layers = list(range(first, engine.n_layer))
    print(f"  steered-minus-unsteered, transformers vs llama.cpp, layers {first}..{last}; "
          f"then the steered states themselves (worst over layers {first}..{last})")
    for tool in tools:
        with steered(model, tool, files[tool]):
            hf_steer = np.stack([streams(model, t) for t in ids])
        d_hf = hf_steer - hf_plain
        err = [max(rel(d_hf[i, L, r], d_ll[i, L, r]) for i in range(len(ids)) for r in (0, 1)) for L in steered_layers]
        sgap = max(rel(hf_steer[i, L, r], ll_steer[i, L, r]) for i in range(len(ids)) for r in (0, 1) for L in steered_layers)
        before = max(float(np.abs(d_hf[:, L]).max()) for L in range(first))  # must stay 0: nothing steered yet
        print(f"  {tool} ({HOOKS[tool][1]} hook): difference error by layer {' '.join(f'{e:.3f}' for e in err)}; "
              f"worst {max(err):.3f}; steered states vs llama.cpp's: worst {sgap:.3f}; change before layer {first}: {before:.2g}")

    # (b) behaviour on the report queries
    if not args.no_behaviour:
        queries = report_queries(args.vector)
        measure = measure_for(str(cv.metadata.get("alignez.axis.measure", "language:fr")), "French-speaking")
        stop = [t for t in (engine.tokenize(x, add_bos=False)[0] for x in ("<|im_end|>", "<|endoftext|>"))]
        qprompts = [engine.prompt(q) for q in queries]
        ll_answers = [c.text for c in Steering.vector(cv, s).generate(engine, qprompts, SAMPLING, share_prefix=True)]
        ll_rate = float(np.mean(measure.scores(queries, ll_answers, None)))
        print(f"\n(b) {measure.label} on the {len(queries)} held-out report queries (greedy, {ANSWER_TOKENS} tokens, "
              f"repetition penalty {SAMPLING.repeat_penalty})")
        print(f"  llama.cpp, vector x{s:g} (our runtime): {ll_rate:.0%}")
        for tool in ["unsteered", *[t for t in args.behaviour_tools.split(",") if t]]:
            t1 = time.time()
            answers = []
            for p in qprompts:
                tokens = engine.tokenize(p)
                if tool == "unsteered":
                    new = greedy(model, tokens, ANSWER_TOKENS, stop, SAMPLING.repeat_penalty)
                else:
                    with steered(model, tool, files[tool]):
                        new = greedy(model, tokens, ANSWER_TOKENS, stop, SAMPLING.repeat_penalty)
                answers.append(engine.detokenize(new))
            rate = float(np.mean(measure.scores(queries, answers, None)))
            print(f"  transformers, {tool + ' file' if tool != 'unsteered' else 'unsteered'}: {rate:.0%} "
                  f"({time.time() - t1:.0f} s); first answer: {answers[0][:90]!r}")
    print(f"\ntook {time.time() - t0:.0f} s, {args.threads} thread(s)")
    engine.close()


if __name__ == "__main__":
    main()

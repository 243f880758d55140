"""How far does a batch move a prompt's gate projection from the prompt read alone? (issue 29, part 5)

    taskset -c 1 python scripts/records/gate_margin.py [--model qwen2.5-coder-0.5b-instruct] [--threads 1]

``read_gates`` reads a batch's gates together and reads again alone only the prompts a batch may
have moved across a threshold; this measures the move that margin must cover. 483 prompts (120
built-in risky and 120 benign requests, and every evaluation prompt; shuffled, seeded) are read
alone (``read_alone``) and in batches of 16 (shared prefix decoded once) and 48 (each prompt whole),
``l_out`` at the last prompt token, at the recipe's candidate layers. Per layer and batching, the
move dx = batch - alone is split into a rescaling of the state and a rest (dx = alpha x + r), and
projected on unit directions of the kinds a gate has: shrinkage-LDA (what the recipe fits) and
plain mean differences of two halves and of 5 random prompt sets each, random directions, the mean
state, and the shipped ``harmless.gguf`` gate at its layer. Printed and written to
results/gate-margin-<model>.json: max |alpha|, max |r|/|x|, and per kind of direction the largest
move as a share of ``BATCH_RESCALE x |p| + BATCH_MARGIN x |x|`` (below 1: the margin covers it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from alignez_local.align.gate_reading import BATCH_MARGIN, BATCH_RESCALE, read_alone
from alignez_local.align.request_contrast import candidate_layers, gate_direction
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.formats.gate import Gates
from alignez_local.prompt_sets import load_eval_prompts, load_request_kinds
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    engine = open_engine(a.model, RuntimeSettings(threads=a.threads))
    kinds = load_request_kinds(None, "harmless")
    users = kinds["risky"][:120] + kinds["benign"][:120] + [p.text for p in load_eval_prompts(kinds={"harmful", "helpful", "benign"})]
    users = [users[i] for i in np.random.default_rng(0).permutation(len(users))]
    prompts = [engine.prompt(u) for u in users]
    layers = candidate_layers(engine.n_layer)
    shipped = REPO / "vectors" / a.model / "harmless.gguf"
    gate = read_control_vector(shipped).gate if shipped.is_file() else None
    t0 = time.time()
    alone = read_alone(engine, prompts, layers).astype(np.float64)
    seconds = {"alone": time.time() - t0}
    out: dict[str, object] = {"model": a.model, "n": len(prompts), "layers": layers, "margin": BATCH_MARGIN,
                              "rescale": BATCH_RESCALE, "batchings": {}}
    for chunk, share in ((16, True), (48, False)):
        engine.share_prefix = share
        t0 = time.time()
        batch = np.concatenate([engine.capture(prompts[i:i + chunk], layers, site="l_out")
                                for i in range(0, len(prompts), chunk)]).astype(np.float64)
        seconds[f"{chunk}{'-shared' if share else ''}"] = time.time() - t0
        rng = np.random.default_rng(1)
        half = len(prompts) // 2
        alpha_max = rest_max = 0.0
        worst: dict[str, float] = {}
        for j, L in enumerate(layers):
            x, xb = alone[:, j], batch[:, j]
            dx = xb - x
            alpha = (dx * x).sum(1) / (x * x).sum(1)
            r = dx - alpha[:, None] * x
            alpha_max = max(alpha_max, float(np.abs(alpha).max()))
            rest_max = max(rest_max, float((np.linalg.norm(r, axis=1) / np.linalg.norm(x, axis=1)).max()))
            dirs = {"lda": [gate_direction(x[:half], x[half:])], "mean difference": [x[:half].mean(0) - x[half:].mean(0)],
                    "random": [rng.standard_normal(x.shape[1])], "mean state": [x.mean(0)]}
            for _ in range(5):
                idx = rng.permutation(len(x))
                dirs["lda"].append(gate_direction(x[idx[:100]], x[idx[100:300]]))
                dirs["mean difference"].append(x[idx[:100]].mean(0) - x[idx[100:300]].mean(0))
            if isinstance(gate, Gates):
                dirs["shipped gate"] = [g.direction.astype(np.float64) for g in gate if g.layer == L]
            for kind, ds in dirs.items():
                for d in ds:
                    d = d / np.linalg.norm(d)
                    allowed = BATCH_MARGIN * np.linalg.norm(xb, axis=1) + BATCH_RESCALE * np.abs(xb @ d)
                    worst[kind] = max(worst.get(kind, 0.0), float((np.abs(dx @ d) / allowed).max()))
        name = f"batches of {chunk}, " + ("shared prefix" if share else "each prompt whole")
        out["batchings"][name] = {"max_alpha": round(alpha_max, 5), "max_rest": round(rest_max, 5),  # type: ignore[index]
                                  "move_over_margin": {k: round(v, 3) for k, v in worst.items()}}
        print(f"{a.model}, {name}: max |alpha| {alpha_max:.4f}, max |r|/|x| {rest_max:.4f}; largest move / margin: "
              + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()), flush=True)
    engine.share_prefix = True
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    (HERE / "results" / f"gate-margin-{a.model}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

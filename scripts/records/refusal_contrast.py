"""Steer along the model's own refuse-vs-comply state, gated by its risky-vs-benign state (issue 10, harmless)

    python scripts/records/refusal_contrast.py [--model qwen2.5-coder-0.5b-instruct] [--threads 1]

request_contrast.py steers along risky-minus-benign requests: gated, it adds 15-18 points of
HarmBench refusals on Qwen and then saturates, because that direction marks *risky* more than
*refuse*. This tries the model's own behaviour as the contrast: it answers the 108 risky built-in
queries of the harmless axis (greedy, 48 tokens), the keyword detector labels each answer refused or
complied, and the direction at each layer is the mean last-prompt-token state (``l_out``) of the
refused requests minus that of the complied ones. The gate is request_contrast's: steer only prompts
whose own state at the gate layer lies on the risky side of the risky/benign midpoint. Measured like
request_contrast: refusals on HarmBench prompts 0..39 and the 35 benign evaluation prompts.
Writes results/refusal-contrast-<model>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alignez_local.prompt_sets import load_eval_prompts
from alignez_local.measures.refusal import is_refusal
from alignez_local.fileio import read_jsonl
from alignez_local.llama.engine import Sampling
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strengths", default="1,2,4")
    ap.add_argument("--layers", default="", help="steering layers (comma list); default: the gate layer")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    rows = list(read_jsonl(REPO / "alignez_local" / "data" / "queries_harmless.jsonl"))
    risky = [r["query"] for r in rows if r["kind"] == "risky"]
    benign = [r["query"] for r in rows if r["kind"] == "benign"]
    harmbench = [x.strip() for x in (REPO.parent / "shared" / "data" / "harmbench_prompts.txt").read_text().splitlines() if x.strip()]
    benign_eval = [p.text for p in load_eval_prompts(kinds={"benign"})]
    out: dict = {"model": a.model}
    tag = a.model + (f"-L{a.layers.replace(',', '_')}" if a.layers else "")
    with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
        layers = list(range(eng.n_layer))
        fmt = lambda qs: [eng.prompt(q) for q in qs]  # noqa: E731
        r_act = eng.capture(fmt(risky), layers, site="l_out").astype(np.float64)
        b_act = eng.capture(fmt(benign), layers, site="l_out").astype(np.float64)
        greedy = Sampling(temperature=0.0, max_tokens=48, repeat_penalty=1.1, seed=0)
        refused = np.array([is_refusal(c.text) for c in eng.generate(fmt(risky), greedy)])
        out["train_refused"] = int(refused.sum())
        print(f"Qwen refuses {int(refused.sum())}/{len(risky)} risky training queries", flush=True)
        refuse_dir = r_act[refused].mean(0) - r_act[~refused].mean(0)  # (layers, d)
        risky_dir = r_act.mean(0) - b_act.mean(0)
        gate_layer = 12 if eng.n_layer == 24 else eng.n_layer // 2
        u = risky_dir[gate_layer] / np.linalg.norm(risky_dir[gate_layer])
        mid = 0.5 * (r_act[:, gate_layer].mean(0) + b_act[:, gate_layer].mean(0)) @ u
        steer_layers = [int(x) for x in a.layers.split(",")] if a.layers else [gate_layer]
        out["gate_layer"], out["steer_layers"] = gate_layer, steer_layers
        out["refuse_norm"] = [float(np.linalg.norm(refuse_dir[L])) for L in layers]
        out["cos_refuse_risky"] = [float(refuse_dir[L] @ risky_dir[L] / np.linalg.norm(refuse_dir[L]) / np.linalg.norm(risky_dir[L])) for L in layers]
        print("cos(refuse, risky) per layer:", " ".join(f"{x:.2f}" for x in out["cos_refuse_risky"]), flush=True)
        sampling = Sampling(temperature=0.0, max_tokens=a.max_tokens, repeat_penalty=1.1, seed=0)
        tests = {"harmbench": fmt(harmbench[:40]), "benign": fmt(benign_eval)}
        gated = {n: eng.capture(p, [gate_layer], site="l_out")[:, 0].astype(np.float64) @ u > mid for n, p in tests.items()}
        out["gate"] = {n: int(g.sum()) for n, g in gated.items()}
        print(f"gate opens on harmbench {out['gate']['harmbench']}/40, benign {out['gate']['benign']}/{len(benign_eval)}", flush=True)
        out["runs"] = {}
        for s in [float(x) for x in a.strengths.split(",")]:
            res = {}
            for name, prompts in tests.items():
                texts = [""] * len(prompts)
                for on in (False, True):
                    idx = [i for i in range(len(prompts)) if gated[name][i] == on]
                    if not idx:
                        continue
                    vec = {L: (s * refuse_dir[L]).astype(np.float32) for L in steer_layers}
                    from contextlib import nullcontext
                    with eng.control_vector(vec) if on else nullcontext():
                        for i, c in zip(idx, eng.generate([prompts[i] for i in idx], sampling)):
                            texts[i] = c.text
                res[name] = {"refusals": sum(map(is_refusal, texts)), "n": len(texts), "answers": texts}
            out["runs"][f"gated {s:g}"] = res
            print(f"gated x{s:g}: refusals harmbench {res['harmbench']['refusals']}/40, benign {res['benign']['refusals']}/{len(benign_eval)}", flush=True)
            (HERE / "results" / f"refusal-contrast-{tag}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Refusals of a gated refusal vector on request sets it was not chosen on (issue 20).

    nice -n 10 python scripts/records/refusal_strength.py --vector NEW.gguf [--vector OLD.gguf ...]
        [--strengths file,2,4] [--dna 150] [--tokens 48] [--sets dna,eval_helpful,eval_benign,harmbench80]

Answers each set greedily (``--tokens`` tokens, repeat penalty 1.1, as the calibration does),
unsteered (once) and with each vector at each strength (``file``: the file's own calibrated
strength), and
counts refusals with the keyword detector (``evaluation/refusal.is_refusal``). A gated vector only
changes the prompts its gate opens on (each read alone; a shut gate is unsteered exactly,
``Steering.generate``), so only those are decoded again at each strength. Sets:

- ``dna``: a seeded random ``--dna`` of Do-Not-Answer's 939 requests (all five risk areas; the
  count per area is recorded): **report only**, never read while choosing anything;
- ``eval_helpful``, ``eval_benign``: the 72 ordinary and 35 edgy-but-benign evaluation prompts
  (over-refusal), and ``eval_harmful``, its 34 harmful ones: **report only** in issue 20 (earlier
  sessions looked at them);
- ``harmbench80``: HarmBench prompts 0-79, the set §7-8 reported on: a **choose** set in issue 20.

``--random``: beside each vector, the null: a random direction with the same per-layer norms behind
the same gate, at the same strengths (it opens on the same prompts, so any difference is the
direction's). ``--prompting``: the ceiling, every prompt answered under the harmless axis's positive
guide as system prompt.

Writes results/refusal-strength-<model>.json (every answer, per set and strength) and prints the
table. Progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gate_states import DNA_AREAS, SHARED  # noqa: E402

from alignez_local.align.axes import get_axis  # noqa: E402
from alignez_local.align.directions import random_like  # noqa: E402
from alignez_local.align.steering import Steering, VectorSlot  # noqa: E402
from alignez_local.prompt_sets import load_eval_prompts  # noqa: E402
from alignez_local.measures.refusal import is_refusal  # noqa: E402
from alignez_local.formats.control_vector import read_control_vector  # noqa: E402
from alignez_local.llama.engine import Sampling  # noqa: E402
from alignez_local.settings import RuntimeSettings, open_engine  # noqa: E402

ROLE = {"dna": "report", "eval_helpful": "report", "eval_benign": "report", "eval_harmful": "report", "harmbench80": "choose"}


def sets(n_dna: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Return set name -> [(prompt, subgroup)] (the subgroup is the Do-Not-Answer risk area)."""
    dna = [(json.loads(x)["prompt"], area) for area in DNA_AREAS
           for x in (SHARED / "donotanswer" / f"{area}.jsonl").read_text().splitlines() if x.strip()]
    dna = list({p: (p, a) for p, a in dna}.values())
    pick = np.random.default_rng(seed).choice(len(dna), size=min(n_dna, len(dna)), replace=False)
    hb = [x.strip() for x in (SHARED / "harmbench_prompts.txt").read_text().splitlines() if x.strip()][:80]
    return {"dna": [dna[i] for i in sorted(pick)],
            "eval_helpful": [(p.text, p.category) for p in load_eval_prompts(kinds={"helpful"})],
            "eval_benign": [(p.text, p.category) for p in load_eval_prompts(kinds={"benign"})],
            "eval_harmful": [(p.text, p.category) for p in load_eval_prompts(kinds={"harmful"})],
            "harmbench80": [(p, "harmbench") for p in hb]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vector", action="append", required=True, help="a gated vector file (repeatable)")
    ap.add_argument("--strengths", default="file")
    ap.add_argument("--dna", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default="dna,eval_helpful,eval_benign")
    ap.add_argument("--tag", default="")
    ap.add_argument("--random", action="store_true", help="add a random direction of the same norms behind each gate")
    ap.add_argument("--prompting", action="store_true", help="add the harmless guide as a system prompt (the ceiling)")
    a = ap.parse_args()
    files = {Path(v).stem: v for v in a.vector}
    vectors = {stem: read_control_vector(v) for stem, v in files.items()}
    if a.random:
        for i, (stem, cv) in enumerate(list(vectors.items())):
            noise = random_like({L: cv.directions[L] for L in cv.layers}, a.seed + 1 + i)
            vectors[f"{stem}-random"] = dataclasses.replace(cv, directions=noise, name="random")
            files[f"{stem}-random"] = files[stem]  # its norms and gate come from that file
    all_sets = sets(a.dna, a.seed)
    chosen = {k: all_sets[k] for k in a.sets.split(",")}
    greedy = Sampling(temperature=0.0, max_tokens=a.tokens, repeat_penalty=1.1)
    out_path = HERE / "results" / f"refusal-strength-{Path(a.model).name.removesuffix('.gguf')}{a.tag}.json"
    out: dict = {"model": a.model, "tokens": a.tokens, "dna_sample": a.dna, "seed": a.seed, "sets": {},
                 "vectors": {n: {"file": p, "file_strength": cv.default_strength, "gate_layer": cv.gate.layer if cv.gate else None,
                                 "strengths": [cv.default_strength_or_one if s == "file" else float(s) for s in a.strengths.split(",")]}
                             for n, cv in vectors.items() for p in [files[n]]}}
    guide = get_axis("harmless").guide("positive")
    t0 = time.monotonic()
    with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
        for name, items in chosen.items():
            prompts = [eng.prompt(p) for p, _ in items]
            base: list[str] = []
            for i in range(0, len(prompts), 16):
                base += [c.text for c in eng.generate(prompts[i:i + 16], greedy)]
                print(f"{name}: unsteered {len(base)}/{len(prompts)}, {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
            rec = {"role": ROLE[name], "n": len(items), "prompts": [p for p, _ in items],
                   "groups": {g: sum(1 for _, x in items if x == g) for g in dict.fromkeys(x for _, x in items)},
                   "unsteered": {"refused": sum(map(is_refusal, base)), "by_group": {}, "answers": base}, "vectors": {}}
            for g in rec["groups"]:
                rec["unsteered"]["by_group"][g] = sum(is_refusal(t) for t, (_, x) in zip(base, items) if x == g)
            if a.prompting:
                asked = [eng.prompt(p, system=guide) for p, _ in items]
                texts = []
                for i in range(0, len(asked), 16):
                    texts += [c.text for c in eng.generate(asked[i:i + 16], greedy)]
                    print(f"{name}: prompting {len(texts)}/{len(asked)}, {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
                rec["prompting"] = {"system": guide, "refused": sum(map(is_refusal, texts)), "answers": texts,
                                    "by_group": {g: sum(is_refusal(t) for t, (_, x) in zip(texts, items) if x == g)
                                                 for g in rec["groups"]}}
                print(f"{name} ({ROLE[name]}): prompting refused {rec['prompting']['refused']} of {len(items)}", flush=True)
            for vname, cv in vectors.items():
                probe = Steering(vectors=[VectorSlot("v", cv, 1.0)])
                opened = ([i for i, o in enumerate(probe.open_gates(eng, prompts)) if o] if cv.gate is not None
                          else list(range(len(prompts))))
                vrec: dict = {"gate_open": len(opened), "opened": opened,
                              "gate_open_by_group": {g: sum(1 for i in opened if items[i][1] == g) for g in rec["groups"]},
                              "steered": {}}
                for s in out["vectors"][vname]["strengths"]:
                    texts = list(base)
                    st = Steering(vectors=[VectorSlot("v", cv, s)])
                    for j in range(0, len(opened), 16):
                        part = opened[j:j + 16]
                        for i, c in zip(part, st.generate(eng, [prompts[i] for i in part], greedy)):
                            texts[i] = c.text
                        print(f"{name}: {vname} x{s:g} {j + len(part)}/{len(opened)} opened, {time.monotonic() - t0:.0f}s",
                              file=sys.stderr, flush=True)
                    vrec["steered"][f"{s:g}"] = {
                        "refused": sum(map(is_refusal, texts)),
                        "by_group": {g: sum(is_refusal(t) for t, (_, x) in zip(texts, items) if x == g) for g in rec["groups"]},
                        "changed": sum(1 for x, y in zip(texts, base) if x != y), "answers": texts}
                rec["vectors"][vname] = vrec
                line = " ".join(f"x{s}: {v['refused']}" for s, v in vrec["steered"].items())
                print(f"{name} ({ROLE[name]}): n {len(items)}, refused unsteered {rec['unsteered']['refused']}; "
                      f"{vname}: gate open {len(opened)}, refused {line}", flush=True)
            out["sets"][name] = rec
            out["seconds"] = round(time.monotonic() - t0, 1)
            out_path.write_text(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

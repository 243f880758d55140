"""Refusals of gated refusal vectors on request sets they were not chosen on (issues 20 and 29).

    taskset -c 1 nice python scripts/records/refusal_strength.py --vector [NAME=]NEW.gguf [--vector OLD.gguf ...]
        [--strengths file,2,4] [--dna 150] [--tokens 48] [--sets dna,eval_helpful,eval_benign,harmbench80]
        [--random] [--prompting] [--reuse EARLIER.json ...] [--tag=-x] [--threads 1]
    python scripts/records/refusal_strength.py --tag=-x --show-changed eval_helpful,eval_benign

Answers each set greedily (``--tokens`` tokens, repeat penalty 1.1, as the calibration does),
unsteered (once) and with each vector at each strength (``file``: the file's own calibrated
strength), and counts refusals with the keyword detector (``measures/refusal.is_refusal``). A gated
vector only changes the prompts its gates open on (each decided as the prompt read alone decides; a
shut gate is unsteered exactly, ``Steering.generate``), so only those are decoded again, in batches
of 16 opened prompts. Sets:

- ``dna``: a seeded random ``--dna`` of Do-Not-Answer's 939 requests (all five risk areas; the
  count per area is recorded); ``dna_all``: all 939, grouped by area (issue 29). **Report only**,
  never read while choosing anything;
- ``eval_helpful``, ``eval_benign``: the 72 ordinary and 35 edgy-but-benign evaluation prompts
  (over-refusal), and ``eval_harmful``, its 34 harmful ones: **report only** since issue 20;
- ``harmbench80``: HarmBench prompts 0-79, a **choose** set in issue 20 (the shipped file's gate
  was picked while reading it); ``harmbench``: all of them, grouped ``hb000-079`` (that part) and
  ``hb080-``: **report only** for a vector the recipe fitted on the built-in requests alone.

``--gate-sets dna_all``: sets whose gates are only read, for each (non-random) vector: open counts
per group, no answers (cheap: a capture that stops at the deepest gate layer).

``--random``: beside each vector, the null: a random direction with the same per-layer norms behind
the same gates, at the same strengths (one Gaussian draw, seed ``--seed`` + 1, scaled to each
vector's norms; it opens on the same prompts, so any difference is the direction's). ``--prompting``: every
prompt answered under the harmless axis's positive guide as system prompt.

``--reuse FILE`` (repeatable; the output file itself is reused when it exists, so a killed run
resumes): unsteered and prompting answers of a set with the same prompts, and a vector's results for
the same file (SHA-256), direction seed and strength, are taken from there instead of decoded again.
So unsteered is answered once across runs, and two vectors can be measured in two runs (one while
the other is being fitted) and merged. Every set is written after each step.

Writes results/refusal-strength-<model><tag>.json (every unsteered answer; each steered answer of an
opened prompt, ``opened_answers`` aligned with ``opened``) and, beside it, a markdown table (.md).
Progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from gate_states import DNA_AREAS, SHARED  # noqa: E402

from alignez_local.align.axes import get_axis  # noqa: E402
from alignez_local.align.directions import random_like  # noqa: E402
from alignez_local.align.steering import Steering, VectorSlot  # noqa: E402
from alignez_local.prompt_sets import load_eval_prompts  # noqa: E402
from alignez_local.measures.refusal import is_refusal  # noqa: E402
from alignez_local.formats.control_vector import ControlVector, read_control_vector  # noqa: E402
from alignez_local.llama.engine import Engine, Sampling  # noqa: E402
from alignez_local.settings import RuntimeSettings, open_engine  # noqa: E402

ROLE = {"dna": "report", "dna_all": "report", "eval_helpful": "report", "eval_benign": "report",
        "eval_harmful": "report", "harmbench80": "choose (issue 20)", "harmbench": "report"}
REFUSE_RIGHT = {"malicious_uses": "yes", "information_hazard": "yes",
                "discrimination_exclusion_toxicity_hateful_offensive": "yes",
                "human_chatbox": "rarely", "misinformation_harms": "rarely"}
"""Whether refusing is the right answer in a Do-Not-Answer area: in "human chatbox" (asking the
assistant about itself, or for emotional support) and "misinformation harms" (leading questions,
rumours, medical misconceptions) a good answer mostly corrects or helps rather than declines."""
BATCH = 16


def sets(n_dna: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Return set name -> [(prompt, subgroup)] (the subgroup is the Do-Not-Answer risk area)."""
    dna = [(json.loads(x)["prompt"], area) for area in DNA_AREAS
           for x in (SHARED / "donotanswer" / f"{area}.jsonl").read_text().splitlines() if x.strip()]
    dna = list({p: (p, a) for p, a in dna}.values())
    pick = np.random.default_rng(seed).choice(len(dna), size=min(n_dna, len(dna)), replace=False)
    hb = [x.strip() for x in (SHARED / "harmbench_prompts.txt").read_text().splitlines() if x.strip()]
    return {"dna": [dna[i] for i in sorted(pick)], "dna_all": dna,
            "eval_helpful": [(p.text, p.category) for p in load_eval_prompts(kinds={"helpful"})],
            "eval_benign": [(p.text, p.category) for p in load_eval_prompts(kinds={"benign"})],
            "eval_harmful": [(p.text, p.category) for p in load_eval_prompts(kinds={"harmful"})],
            "harmbench80": [(p, "harmbench") for p in hb[:80]],
            "harmbench": [(p, "hb000-079" if i < 80 else "hb080-") for i, p in enumerate(hb)]}


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def by_group(texts: list[str], items: list[tuple[str, str]], groups: dict[str, int]) -> dict[str, int]:
    return {g: sum(is_refusal(t) for t, (_, x) in zip(texts, items) if x == g) for g in groups}


def answer(eng: Engine, prompts: list[str], greedy: Sampling, label: str, t0: float) -> list[str]:
    """Unsteered answers in batches of ``BATCH``, in order."""
    out: list[str] = []
    for i in range(0, len(prompts), BATCH):
        out += [c.text for c in eng.generate(prompts[i:i + BATCH], greedy)]
        print(f"{label} {len(out)}/{len(prompts)}, {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return out


def load_reuse(paths: list[Path]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Merge earlier results files: set name -> set record, vector name -> vector record."""
    sets_: dict[str, dict[str, Any]] = {}
    vecs: dict[str, dict[str, Any]] = {}
    for p in paths:
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        vecs.update({k: v for k, v in d.get("vectors", {}).items() if "sha256" in v})
        for name, rec in d.get("sets", {}).items():
            have = sets_.setdefault(name, {**rec, "vectors": {}})
            if have["prompts"] != rec["prompts"]:
                continue
            for k in ("unsteered", "prompting"):
                if k in rec and k not in have:
                    have[k] = rec[k]
            for vname, vrec in rec.get("vectors", {}).items():
                if vname in d.get("vectors", {}) and "sha256" in d["vectors"][vname]:
                    have["vectors"].setdefault(vname, {**vrec, "meta": d["vectors"][vname]})
    return sets_, vecs


def same_vector(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("sha256") == b.get("sha256") and a.get("random_seed") == b.get("random_seed")


def table(out: dict[str, Any]) -> str:
    """The markdown table: refusals per set (and Do-Not-Answer area) and the gates' open counts."""
    vnames = [v for v in out["vectors"] if not v.endswith("-random")]
    head = "| set | role | n | unsteered |"
    rule = "|---|---|---:|---:|"
    for v in vnames:
        for s in out["vectors"][v]["strengths"]:
            head += f" {v}: gate opens | {v} x{s:g} | random x{s:g}, same gates |"
            rule += "---:|---:|---:|"
    lines = [head, rule]
    for name, rec in out["sets"].items():
        rows = [(name, None, rec["n"])] + ([(name, g, c) for g, c in rec["groups"].items()] if len(rec["groups"]) > 1 else [])
        for sname, g, n in rows:
            label = sname if g is None else f"  {g}" + (f" (refusing right: {REFUSE_RIGHT[g]})" if g in REFUSE_RIGHT else "")
            u = None if "unsteered" not in rec else rec["unsteered"]["refused"] if g is None else rec["unsteered"]["by_group"][g]
            cells = [label, (rec["role"] + (", gates only" if rec.get("gates_only") else "")) if g is None else "", str(n),
                     "" if u is None else f"{u} ({100 * u / n:.1f}%)"]
            for v in vnames:
                vrec = rec["vectors"].get(v)
                rrec = rec["vectors"].get(f"{v}-random")
                for s in out["vectors"][v]["strengths"]:
                    key = f"{s:g}"
                    if vrec is None:
                        cells += ["", "", ""]
                        continue
                    o = vrec["gate_open"] if g is None else vrec["gate_open_by_group"][g]
                    cells.append(f"{o} ({100 * o / n:.1f}%)")
                    for r in (vrec, rrec):
                        st = None if r is None else r["steered"].get(key)
                        c = None if st is None else (st["refused"] if g is None else st["by_group"][g])
                        cells.append("" if c is None else f"{c} ({100 * c / n:.1f}%)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def show_changed(path: Path, names: list[str]) -> None:
    """Print each answer a vector changed in ``names``: the prompt, unsteered and steered, refusal or not."""
    d = json.loads(path.read_text())
    for name in names:
        rec = d["sets"][name]
        for vname, vrec in rec["vectors"].items():
            for key, st in vrec["steered"].items():
                print(f"## {name}: {vname} x{key}: {len(st['changed'])} of {rec['n']} answers changed")
                steered = dict(zip(vrec["opened"], st["opened_answers"]))
                for i in st["changed"]:
                    u, v = rec["unsteered"]["answers"][i], steered[i]
                    print(f"[{i}] {rec['prompts'][i]!r}\n  unsteered ({'refusal' if is_refusal(u) else 'answer'}): {u!r}\n"
                          f"  steered ({'refusal' if is_refusal(v) else 'answer'}): {v!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vector", action="append", default=[], help="[NAME=]a gated vector file (repeatable)")
    ap.add_argument("--unsteered-only", action="store_true", help="no vector: answer each set unsteered (and prompted)")
    ap.add_argument("--strengths", default="file")
    ap.add_argument("--dna", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default="dna,eval_helpful,eval_benign")
    ap.add_argument("--tag", default="")
    ap.add_argument("--reuse", action="append", default=[], help="an earlier results file to take answers from")
    ap.add_argument("--random", action="store_true", help="add a random direction of the same norms behind each gate")
    ap.add_argument("--prompting", action="store_true", help="add the harmless guide as a system prompt (the ceiling)")
    ap.add_argument("--gate-sets", default="", metavar="SET,...", help="sets whose gates are read, no answers (after --sets)")
    ap.add_argument("--show-changed", default="", metavar="SET,...",
                    help="print, from the results file, every answer of these sets each vector changed (no model run)")
    a = ap.parse_args()
    if a.show_changed:
        show_changed(HERE / "results" / f"refusal-strength-{Path(a.model).name.removesuffix('.gguf')}{a.tag}.json",
                     a.show_changed.split(","))
        return
    if not a.vector and not a.unsteered_only:
        ap.error("give at least one --vector (or --unsteered-only: a model's own refusals, issue 29 part 6)")
    files = dict((v.split("=", 1) if "=" in v else (Path(v).stem, v)) for v in a.vector)
    vectors: dict[str, ControlVector] = {stem: read_control_vector(v) for stem, v in files.items()}
    seeds: dict[str, int | None] = {stem: None for stem in vectors}
    if a.random:  # each vector's null right after it
        for stem, cv in list(vectors.items()):
            seeds[f"{stem}-random"] = a.seed + 1
            noise = random_like({L: cv.directions[L] for L in cv.layers}, a.seed + 1)
            vectors[f"{stem}-random"] = dataclasses.replace(cv, directions=noise, name="random")
            files[f"{stem}-random"] = files[stem]  # its norms and gates come from that file
        vectors = {k: vectors[k] for stem in files if not stem.endswith("-random") for k in (stem, f"{stem}-random")}
    all_sets = sets(a.dna, a.seed)
    chosen = {k: all_sets[k] for k in a.sets.split(",")}
    greedy = Sampling(temperature=0.0, max_tokens=a.tokens, repeat_penalty=1.1)
    out_path = HERE / "results" / f"refusal-strength-{Path(a.model).name.removesuffix('.gguf')}{a.tag}.json"
    old_sets, old_vecs = load_reuse([Path(p) for p in a.reuse] + [out_path])
    out: dict = {"model": a.model, "tokens": a.tokens, "dna_sample": a.dna, "seed": a.seed, "sets": {},
                 "vectors": {n: {"file": p, "sha256": sha256(p), "random_seed": seeds[n], "file_strength": cv.default_strength,
                                 "gates": cv.gate.summary() if cv.gate is not None else None,
                                 "strengths": [cv.default_strength_or_one if s == "file" else float(s) for s in a.strengths.split(",")]}
                             for n, cv in vectors.items() for p in [files[n]]}}
    guide = get_axis("harmless").guide("positive")
    t0 = time.monotonic()

    def save() -> None:
        out["seconds"] = round(time.monotonic() - t0, 1)
        out_path.write_text(json.dumps(out, indent=1, ensure_ascii=False))
        out_path.with_suffix(".md").write_text(table(out))

    with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
        recs: dict[str, dict[str, Any]] = {}
        for name, items in chosen.items():  # unsteered first, every set: each vector's run needs them
            prompts = [eng.prompt(p) for p, _ in items]
            rec = {"role": ROLE[name], "n": len(items), "prompts": [p for p, _ in items],
                   "groups": {g: sum(1 for _, x in items if x == g) for g in dict.fromkeys(x for _, x in items)},
                   "vectors": {}}
            old = old_sets.get(name)
            old = old if old is not None and old["prompts"] == rec["prompts"] else None
            if old is not None and "unsteered" in old:
                rec["unsteered"] = old["unsteered"]
                print(f"{name}: unsteered answers reused", file=sys.stderr, flush=True)
            else:
                base = answer(eng, prompts, greedy, f"{name}: unsteered", t0)
                rec["unsteered"] = {"refused": sum(map(is_refusal, base)), "by_group": by_group(base, items, rec["groups"]),
                                    "answers": base}
            if a.prompting:
                if old is not None and "prompting" in old:
                    rec["prompting"] = old["prompting"]
                else:
                    texts = answer(eng, [eng.prompt(p, system=guide) for p, _ in items], greedy, f"{name}: prompting", t0)
                    rec["prompting"] = {"system": guide, "refused": sum(map(is_refusal, texts)), "answers": texts,
                                        "by_group": by_group(texts, items, rec["groups"])}
            recs[name] = rec
            out["sets"][name] = rec
            save()
            print(f"{name} ({rec['role']}): n {len(items)}, refused unsteered {rec['unsteered']['refused']}", flush=True)
        for name, items in chosen.items():  # set by set: every vector on a set before the next set
            for vname, cv in vectors.items():
                rec = recs[name]
                base = rec["unsteered"]["answers"]
                prompts = [eng.prompt(p) for p, _ in items]
                old = old_sets.get(name, {}).get("vectors", {}).get(vname)
                if old is not None and (not same_vector(old["meta"], out["vectors"][vname])
                                        or old_sets[name]["prompts"] != rec["prompts"]):
                    old = None
                parent = vname.removesuffix("-random")
                if old is not None:
                    opened = old["opened"]
                elif vname != parent and parent in rec["vectors"]:
                    opened = rec["vectors"][parent]["opened"]  # the same gates: the same prompts open
                elif cv.gate is not None:
                    probe = Steering(vectors=[VectorSlot("v", cv, 1.0)])
                    opened = [i for i, o in enumerate(probe.open_gates(eng, prompts)) if o]
                    print(f"{name}: {vname} gates read, {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
                else:
                    opened = list(range(len(prompts)))
                vrec: dict = {"gate_open": len(opened), "opened": opened,
                              "gate_open_by_group": {g: sum(1 for i in opened if items[i][1] == g) for g in rec["groups"]},
                              "steered": {}}
                for s in out["vectors"][vname]["strengths"]:
                    key = f"{s:g}"
                    if old is not None and key in old["steered"]:
                        vrec["steered"][key] = old["steered"][key]
                        continue
                    texts = list(base)
                    st = Steering(vectors=[VectorSlot("v", cv, s)])
                    for j in range(0, len(opened), BATCH):
                        part = opened[j:j + BATCH]
                        done = st.generate(eng, [prompts[i] for i in part], greedy,
                                           opens=[frozenset({0})] * len(part) if cv.gate is not None else None)
                        for i, c in zip(part, done):
                            texts[i] = c.text
                        print(f"{name}: {vname} x{s:g} {j + len(part)}/{len(opened)} opened, {time.monotonic() - t0:.0f}s",
                              file=sys.stderr, flush=True)
                    vrec["steered"][key] = {
                        "refused": sum(map(is_refusal, texts)), "by_group": by_group(texts, items, rec["groups"]),
                        "changed": [i for i in opened if texts[i] != base[i]],
                        "opened_answers": [texts[i] for i in opened]}
                    rec["vectors"][vname] = vrec
                    save()
                rec["vectors"][vname] = vrec
                save()
                line = " ".join(f"x{s}: {v['refused']}" for s, v in vrec["steered"].items())
                print(f"{name} ({rec['role']}): n {len(items)}, refused unsteered {rec['unsteered']['refused']}; "
                      f"{vname}: gates open {len(opened)}, refused {line}", flush=True)
        for name in [x for x in a.gate_sets.split(",") if x]:  # gates read, no answers
            items = all_sets[name]
            grec = old_sets.get(name, {}) if old_sets.get(name, {}).get("prompts") == [p for p, _ in items] else {}
            rec = {"role": ROLE[name], "n": len(items), "prompts": [p for p, _ in items], "gates_only": True,
                   "groups": {g: sum(1 for _, x in items if x == g) for g in dict.fromkeys(x for _, x in items)},
                   "vectors": {}}
            out["sets"][name] = rec
            for vname, cv in vectors.items():
                if vname.endswith("-random") or cv.gate is None:
                    continue
                old = grec.get("vectors", {}).get(vname)
                if old is not None and same_vector(old["meta"], out["vectors"][vname]):
                    opened = old["opened"]
                else:
                    probe = Steering(vectors=[VectorSlot("v", cv, 1.0)])
                    opened = [i for i, o in enumerate(probe.open_gates(eng, [eng.prompt(p) for p, _ in items])) if o]
                rec["vectors"][vname] = {"gate_open": len(opened), "opened": opened, "steered": {},
                                         "gate_open_by_group": {g: sum(1 for i in opened if items[i][1] == g) for g in rec["groups"]}}
                save()
                print(f"{name} (gates only): n {len(items)}; {vname}: gates open {len(opened)} "
                      f"{rec['vectors'][vname]['gate_open_by_group']}, {time.monotonic() - t0:.0f}s", flush=True)
    save()
    print(table(out))


if __name__ == "__main__":
    main()

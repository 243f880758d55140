"""The unsteered request states every gate experiment of issue 20 reads, captured once and cached.

    nice -n 10 python scripts/records/gate_states.py [--model qwen2.5-coder-0.5b-instruct] [--sets all]

Reads ``l_out`` at the last prompt token, each prompt decoded ALONE (``steering.read_alone``: how
``Steering`` reads a gate at run time, so a prompt's state does not depend on its neighbours), at
layers ``LAYERS``, for every request set of ``request_sets()``: the built-in risky and benign
requests the recipe fits on, HarmBench, each Do-Not-Answer risk area and the evaluation prompts.
States are cached per prompt text in ``runs/gate-states/<model>.npz`` (``runs/`` is not committed),
so a set whose texts change (new built-in data) only costs its new prompts. Progress: one line per
50 prompts on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = REPO.parent / "shared" / "data"
CACHE = REPO / "runs" / "gate-states"
LAYERS = list(range(3, 19))  # Qwen 0.5B has 24 layers; the recipe's candidates are 6..12
DNA_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
             "malicious_uses", "misinformation_harms")


def request_sets() -> dict[str, list[str]]:
    """Return every named request set the gate experiments read (texts as the user types them)."""
    from alignez_local.prompt_sets import load_eval_prompts, load_request_kinds

    kinds = load_request_kinds(None, "harmless")
    sets = {"builtin_risky": kinds["risky"], "builtin_benign": kinds["benign"]}
    sets["harmbench"] = [x.strip() for x in (SHARED / "harmbench_prompts.txt").read_text().splitlines() if x.strip()]
    for area in DNA_AREAS:
        rows = (SHARED / "donotanswer" / f"{area}.jsonl").read_text().splitlines()
        sets[f"dna_{area}"] = list(dict.fromkeys(json.loads(x)["prompt"] for x in rows if x.strip()))
    for kind in ("helpful", "benign", "harmful"):
        sets[f"eval_{kind}"] = [p.text for p in load_eval_prompts(kinds={kind})]
    return sets


class StateCache:
    """Prompt text -> (len(LAYERS), n_embd) float32 state, kept in one npz file per model."""

    def __init__(self, model: str) -> None:
        self.path = CACHE / f"{model}.npz"
        self.states: dict[str, np.ndarray] = {}
        if self.path.is_file():
            z = np.load(self.path, allow_pickle=False)
            if [int(x) for x in z["layers"]] == LAYERS:
                self.states = dict(zip((str(t) for t in z["texts"]), z["states"]))

    def save(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        texts = list(self.states)
        np.savez(tmp, layers=np.array(LAYERS), texts=np.array(texts), states=np.stack([self.states[t] for t in texts]))
        tmp.replace(self.path)

    def get(self, texts: list[str]) -> np.ndarray:
        """Return the cached states of ``texts`` (n, len(LAYERS), n_embd); all must be cached."""
        missing = [t for t in texts if t not in self.states]
        if missing:
            raise SystemExit(f"{len(missing)} prompts not captured yet (first: {missing[0]!r}); run gate_states.py")
        return np.stack([self.states[t] for t in texts]).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default="all", help="comma-separated set names (default: all)")
    a = ap.parse_args()
    from alignez_local.align.gate_reading import read_alone
    from alignez_local.settings import RuntimeSettings, open_engine

    sets = request_sets()
    names = list(sets) if a.sets == "all" else a.sets.split(",")
    cache = StateCache(a.model)
    todo = list(dict.fromkeys(t for n in names for t in sets[n] if t not in cache.states))
    print(f"{len(todo)} prompts to capture ({len(cache.states)} cached)", file=sys.stderr, flush=True)
    if not todo:
        return
    t0 = time.monotonic()
    with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
        for i in range(0, len(todo), 50):
            part = todo[i:i + 50]
            for text, state in zip(part, read_alone(eng, [eng.prompt(t) for t in part], LAYERS)):
                cache.states[text] = state.astype(np.float32)
            cache.save()
            print(f"{i + len(part)}/{len(todo)} captured, {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

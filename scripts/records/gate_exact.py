"""Is a shut gate unsteered, exactly? (issue 20)

    nice -n 10 python scripts/records/gate_exact.py [--model qwen2.5-coder-0.5b-instruct]
        [--vector vectors/qwen2.5-coder-0.5b-instruct/harmless.gguf] [--n 100] [--risky-every 8]
        [--tokens 128] [--old]

Answers ``--n`` ordinary requests (``requests_ordinary.jsonl`` and the helpful evaluation prompts,
alternately) greedily, unsteered and with the gated vector at its file's strength, in the chunks
``alignez eval`` uses (2 x n_parallel prompts per ``generate`` call). The shipped Qwen gate opens on
none of these 100 (read alone), and a chunk where nothing opens is trivially unsteered; so a
harmful evaluation prompt takes every ``--risky-every``-th place (the gate opens on most of them)
and the chunks are mixed, as in an evaluation of mixed prompts. It prints:
- on how many the gate opens (each prompt read alone, as ``Steering`` reads it), and on how many
  the old reading (the chunk captured together, shared prefix decoded once) decides otherwise;
- how many answers the gate stays shut on differ from the unsteered ones (tokens; and log-probability
  bits): the target is 0;
- with ``--old``: the same for the old way ``Steering.generate`` decoded a chunk (one run, the vector
  added to the opened prompts' rows by a per-sequence edit: ``with st.applied(...): generate``),
  which is how the issue's 25 of 80 arose.
Writes results/gate-exact-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from alignez_local.align.steering import Steering
from alignez_local.prompt_sets import load_eval_prompts
from alignez_local.formats.gate import GATE_SITE
from alignez_local.llama.engine import Completion, Sampling
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def ordinary(n: int) -> list[str]:
    tasks = [json.loads(line)["query"] for line in (REPO / "alignez_local" / "data" / "requests_ordinary.jsonl").read_text().splitlines() if line.strip()]
    helpful = [p.text for p in load_eval_prompts(kinds={"helpful"})]
    mixed = [q for pair in zip(tasks, helpful) for q in pair] + tasks[len(helpful):] + helpful[len(tasks):]
    return mixed[:n]


def with_risky(users: list[str], every: int) -> tuple[list[str], list[bool]]:
    """Return ``users`` with a harmful evaluation prompt at every ``every``-th place, and which are ordinary."""
    if every <= 0:
        return users, [True] * len(users)
    risky = iter(p.text for p in load_eval_prompts(kinds={"harmful"}))
    out: list[str] = []
    kind: list[bool] = []
    for u in users:
        if len(out) % every == every - 1:
            r = next(risky, None)
            if r is not None:
                out.append(r)
                kind.append(False)
        out.append(u)
        kind.append(True)
    return out, kind


def first_diff(a: Completion, b: Completion) -> int:
    return next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))


def compare(name: str, got: list[Completion], plain: list[Completion], opens: np.ndarray, ordinary: np.ndarray) -> dict:
    shut = np.flatnonzero(~opens)
    tok = [int(i) for i in shut if got[i].tokens != plain[i].tokens]
    bits = [int(i) for i in shut if not np.array_equal(got[i].token_logprobs, plain[i].token_logprobs)]
    opened_diff = [int(i) for i in np.flatnonzero(opens) if got[i].tokens != plain[i].tokens]
    n_ord = [int(i) for i in tok if ordinary[i]]
    print(f"{name}: gate shut on {len(shut)} ({int((~opens & ordinary).sum())} ordinary): answers differing from "
          f"unsteered {len(tok)} ({len(n_ord)} ordinary) by tokens, {len(bits)} by log-probability bits; "
          f"gate open on {int(opens.sum())}: {len(opened_diff)} differ", flush=True)
    for i in tok:
        print(f"  shut #{i}: parts at token {first_diff(got[i], plain[i])} of {plain[i].n_tokens}", flush=True)
    return {"shut": len(shut), "shut_ordinary": int((~opens & ordinary).sum()), "shut_differ_tokens": tok,
            "shut_differ_bits": bits, "opened": int(opens.sum()), "opened_differ": opened_diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vector", default=str(REPO / "vectors" / "qwen2.5-coder-0.5b-instruct" / "harmless.gguf"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--risky-every", type=int, default=8, help="a harmful prompt at every K-th place (0: none)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old", action="store_true", help="also decode each chunk the old way (one run, per-sequence edit)")
    a = ap.parse_args()
    users, kind = with_risky(ordinary(a.n), a.risky_every)
    is_ordinary = np.array(kind)
    sp = Sampling(temperature=0.0, max_tokens=a.tokens)
    vector = Path(a.vector).resolve()
    out: dict = {"model": a.model, "vector": str(vector.relative_to(REPO) if vector.is_relative_to(REPO) else vector), "n_ordinary": int(is_ordinary.sum()), "n_risky": int((~is_ordinary).sum()),
                 "tokens": a.tokens, "threads": a.threads}
    t0 = time.monotonic()
    with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
        st = Steering.from_specs(eng, vectors=[a.vector])
        slot = st.vectors[0]
        gate = slot.vector.gate
        assert gate is not None, "the vector has no gate"
        prompts = [eng.prompt(u) for u in users]
        step = 2 * eng.n_parallel  # the chunks alignez eval decodes together (evaluation/answers.py)
        chunks = [list(range(s, min(s + step, len(prompts)))) for s in range(0, len(prompts), step)]
        opens = st.gates(eng, prompts, slot)
        u = gate.direction.astype(np.float64)
        alone = np.concatenate([eng.capture([prompts[i]], [gate.layer], site=GATE_SITE)[:, 0] for i in range(len(prompts))]) @ u
        batched = np.concatenate([eng.capture([prompts[i] for i in c], [gate.layer], site=GATE_SITE)[:, 0] for c in chunks]) @ u
        flips = np.flatnonzero((alone > gate.threshold) != (batched > gate.threshold))
        print(f"{a.model}, {int(is_ordinary.sum())} ordinary requests + {int((~is_ordinary).sum())} harmful ones, "
              f"{a.tokens} greedy tokens, strength {slot.strength:g}, {a.threads} thread(s)", flush=True)
        print(f"gate (layer {gate.layer}) opens on {int((opens & is_ordinary).sum())} ordinary and "
              f"{int((opens & ~is_ordinary).sum())} harmful, read alone: {np.flatnonzero(opens).tolist()}; "
              f"read in the eval chunk it decides otherwise on {len(flips)} {flips.tolist()} "
              f"(max |projection alone - in chunk| {np.abs(alone - batched).max():.4f}, "
              f"nearest to the threshold {np.abs(alone - gate.threshold).min():.4f})", flush=True)
        out["gate"] = {"layer": gate.layer, "opens": np.flatnonzero(opens).tolist(), "ordinary_opened": int((opens & is_ordinary).sum()), "chunk_flips": flips.tolist(),
                       "max_proj_diff": float(np.abs(alone - batched).max())}
        runs: dict[str, list[Completion]] = {"unsteered": [], "gated": [], "old": []}
        for c in chunks:
            part = [prompts[i] for i in c]
            t = time.monotonic()
            runs["unsteered"] += eng.generate(part, sp)
            runs["gated"] += st.generate(eng, part, sp)
            if a.old:
                with st.applied(eng, part):
                    runs["old"] += eng.generate(part, sp)
            print(f"  prompts {c[0]}-{c[-1]} ({int(opens[c].sum())} opened): {time.monotonic() - t:.0f}s", flush=True)
        out["gated"] = compare("Steering.generate", runs["gated"], runs["unsteered"], opens, is_ordinary)
        if a.old:
            out["old"] = compare("old one-run path (applied + generate)", runs["old"], runs["unsteered"], opens, is_ordinary)
    out["ordinary"] = is_ordinary.tolist()
    out["seconds"] = round(time.monotonic() - t0)
    print(f"took {out['seconds']}s", flush=True)
    (HERE / "results" / f"gate-exact-{a.model}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Step 1 of AlignEZ: the model writes its own preference data.

For every query and axis (a positive and a negative persona) the model is asked, per persona,
what an answer should be like (the characteristics), then to answer conditioned on them. The
prompts follow the paper's wording (method.md §1). For a chat model they are sent as the user
turn of its chat template; for a base model, in the engine's plain ``User:/Assistant:`` format.

Records are appended one per line and flushed as soon as a chunk of queries is done, so a killed
run loses at most the chunk in flight; a re-run with the same output file skips every record it
already has (keyed by axis, query and response index) and never duplicates one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alignez_local.align.axes import PreferenceAxis
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.errors import AlignezError
from alignez_local.fileio import JsonlAppender, read_jsonl
from alignez_local.progress import Progress

CHARACTERISTICS_PROMPT = {
    "positive": "{query}\nYou are a {persona} assistant. Your answer to this query should:",
    "negative": "{query}\nPretend you are a {persona} assistant. Your response to this query should:",
}
RESPONSE_PROMPT = {
    "positive": "You are a {persona} assistant. Your answer should {characteristics}\n{query}",
    "negative": "Pretend you are a {persona} assistant. Your answer should {characteristics}\n{query}",
}
SIDES = ("positive", "negative")


@dataclass(frozen=True)
class GenerationSettings:
    """How preference data is sampled (recorded with every pair)."""

    temperature: float = 0.7
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    characteristics_tokens: int = 48
    response_tokens: int = 160
    responses_per_query: int = 1
    seed: int = 0


def pair_id(axis: PreferenceAxis, query: str, k: int) -> str:
    """Return the stable identity of one pair: the same axis, query and response index, the same id."""
    h = hashlib.sha256(json.dumps([axis.name, axis.positive, axis.negative, query, k]).encode()).hexdigest()
    return h[:16]


def _clean(text: str) -> str:
    # The characteristics are spliced into the next prompt: one line, no dangling list marker.
    return " ".join(text.split()).strip().lstrip("-*: ").strip()


def model_identity(engine: Engine, sha256: str) -> dict[str, Any]:
    """Return what identifies the model that wrote or reads the data."""
    return {"file": engine.path.name, "sha256": sha256, "arch": engine.arch, "n_layer": engine.n_layer, "n_embd": engine.n_embd}


def generate_preferences(
    engine: Engine,
    queries: Sequence[str],
    axis: PreferenceAxis,
    out_path: str | Path,
    settings: GenerationSettings = GenerationSettings(),
    model_sha256: str = "",
    quiet: bool = False,
) -> tuple[int, int]:
    """Append missing preference pairs to ``out_path``; return (pairs written now, pairs already there)."""
    out_path = Path(out_path)
    have: set[str] = set()
    if out_path.exists():
        for rec in read_jsonl(out_path):
            if "id" in rec:
                have.add(str(rec["id"]))
    todo = [
        (q, k, pair_id(axis, q, k))
        for q in queries
        for k in range(settings.responses_per_query)
        if pair_id(axis, q, k) not in have
    ]
    total = len(queries) * settings.responses_per_query
    already = total - len(todo)
    if not todo:
        return 0, already
    ident = model_identity(engine, model_sha256)
    chunk = max(1, engine.n_parallel // 2)  # two personas per pair share the parallel slots
    written = 0
    bar = Progress(total, f"generate {axis.name}", done=already, quiet=quiet)
    with JsonlAppender(out_path) as out:
        try:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                for rec in _generate_chunk(engine, part, axis, settings, ident):
                    out.append(rec)
                    written += 1
                    bar.update()
        finally:
            bar.close()
    return written, already


def _sampling(s: GenerationSettings, seed: int, max_tokens: int, stop: tuple[str, ...]) -> Sampling:
    return Sampling(
        temperature=s.temperature, top_p=s.top_p, repeat_penalty=s.repeat_penalty,
        seed=seed % (2**32 - 2), max_tokens=max_tokens, stop=stop,
    ).check()


def _seed(settings: GenerationSettings, pid: str, side: str, step: str) -> int:
    # Per-pair seeds derived from the id: a resumed run samples exactly what the first would have.
    return int(hashlib.sha256(f"{settings.seed}:{pid}:{side}:{step}".encode()).hexdigest()[:8], 16)


def _generate_chunk(
    engine: Engine, part: list[tuple[str, int, str]], axis: PreferenceAxis, s: GenerationSettings, ident: dict[str, Any]
) -> list[dict[str, Any]]:
    personas = {"positive": axis.positive, "negative": axis.negative}
    stop = engine.default_stop
    jobs = [(q, k, pid, side) for q, k, pid in part for side in SIDES]
    prompts = [engine.prompt(CHARACTERISTICS_PROMPT[side].format(query=q, persona=personas[side])) for q, _, _, side in jobs]
    chars = engine.generate(
        prompts, [_sampling(s, _seed(s, pid, side, "c"), s.characteristics_tokens, stop + ("\n\n",)) for _, _, pid, side in jobs]
    )
    char_text = [_clean(c.text) or "be a typical answer" for c in chars]
    prompts = [
        engine.prompt(RESPONSE_PROMPT[side].format(persona=personas[side], characteristics=ct, query=q))
        for (q, _, _, side), ct in zip(jobs, char_text)
    ]
    answers = engine.generate(
        prompts, [_sampling(s, _seed(s, pid, side, "r"), s.response_tokens, stop) for _, _, pid, side in jobs]
    )
    records = []
    for i in range(0, len(jobs), 2):
        q, k, pid, _ = jobs[i]
        records.append(
            {
                "id": pid,
                "query": q,
                "response_index": k,
                "axis": {"name": axis.name, "positive": axis.positive, "negative": axis.negative},
                "characteristics": {"positive": char_text[i], "negative": char_text[i + 1]},
                "response": {"positive": answers[i].text.strip(), "negative": answers[i + 1].text.strip()},
                "finish_reason": {"positive": answers[i].finish_reason, "negative": answers[i + 1].finish_reason},
                "sampling": asdict(s),
                "seed": {side: _seed(s, pid, side, "r") for side in SIDES},
                "model": ident,
            }
        )
    return records


@dataclass(frozen=True)
class PreferencePair:
    """One stored pair, as read back for fitting."""

    id: str
    query: str
    axis: str
    positive: str
    negative: str
    personas: tuple[str, str] = ("", "")  # the axis's positive and negative persona


def load_pairs(path: str | Path, axis: str | None = None) -> list[PreferencePair]:
    """Return the usable pairs in a preference file (optionally one axis), checked for structure."""
    p = Path(path)
    if not p.is_file():
        raise AlignezError(f"preference file {p} not found; create it with: alignez generate -o {p}")
    pairs: list[PreferencePair] = []
    for n, rec in enumerate(read_jsonl(p), 1):
        try:
            pair = PreferencePair(
                str(rec["id"]), str(rec["query"]), str(rec["axis"]["name"]),
                str(rec["response"]["positive"]), str(rec["response"]["negative"]),
                (str(rec["axis"].get("positive", "")), str(rec["axis"].get("negative", ""))),
            )
        except (KeyError, TypeError):
            raise AlignezError(f"{p} record {n} is not a preference pair (needs id, query, axis, response); was it made by alignez generate?") from None
        if axis is None or pair.axis == axis:
            if pair.positive and pair.negative:
                pairs.append(pair)
    if not pairs:
        what = f" for axis {axis!r}" if axis else ""
        raise AlignezError(f"{p} has no usable preference pairs{what}; run alignez generate first")
    axes = {x.axis for x in pairs}
    if len(axes) > 1:
        raise AlignezError(f"{p} holds several axes ({', '.join(sorted(axes))}); choose one with --axis")
    return pairs


def data_sha256(pairs: Sequence[PreferencePair]) -> str:
    """Return a hash of the pairs' content (order-independent): the data identity in provenance."""
    h = hashlib.sha256()
    for pair in sorted(pairs, key=lambda x: x.id):
        h.update(json.dumps([pair.id, pair.query, pair.positive, pair.negative]).encode())
    return h.hexdigest()

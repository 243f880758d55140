"""Step 1 of AlignEZ: the model writes its own preference data.

For every query and axis (a positive and a negative persona) the model answers once per persona,
as the recipe asks (``recipes.py``: the paper's two steps, or the persona in a system prompt for
small models). For a chat model the prompts use its chat template; for a base model, the engine's
plain ``User:/Assistant:`` format. Every record stores its recipe, the sampling settings and
whether either answer reads as a refusal (``measures.refusal.is_refusal``).

``writer`` (``remote_text.RemoteWriter``, ``steer --generate-url``): the answers come from
OpenAI-compatible servers serving the same model, from the same prompt text and sampling; every
record then names the servers (``written_by``). The self-check, where a recipe has one, reads the
local model's logits.

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
from alignez_local.align.recipes import Recipe, get_recipe
from alignez_local.align.remote_text import RemoteWriter
from alignez_local.align.selfcheck import DEFAULT_CHECK, check_records, select_pairs
from alignez_local.measures.refusal import is_refusal
from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.errors import AlignezError
from alignez_local.fileio import JsonlAppender, read_jsonl
from alignez_local.progress import Progress, token_work

SIDES = ("positive", "negative")


@dataclass(frozen=True)
class GenerationSettings:
    """How preference data is sampled (recorded with every pair)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40  # cuts the long tail a 135M model samples nonsense from at temperature 0.7
    repeat_penalty: float = 1.1
    characteristics_tokens: int = 48
    # 48: the plain recipe reads the behaviour over every answer token, and generation is the
    # second-largest stage of a steer run (the paper used about 200 tokens). Measured on Qwen 0.5B,
    # French (scripts/pair_length.py): the vector from the same pairs cut at 48 tokens has cosine
    # 0.993 per layer to the 96-token one; from steer's 24 queries at 48 tokens 0.974 (docs/performance.md).
    # The CLI's --response-tokens and the Python API both default to this one value.
    response_tokens: int = 48
    responses_per_query: int = 1
    seed: int = 0


def pair_id(axis: PreferenceAxis, query: str, k: int, recipe: str = "paper") -> str:
    """Return the stable identity of one pair: the same axis, query, response index and recipe, the same id.

    The ``paper`` recipe keeps the id it had before recipes existed, so old files resume as they did.
    """
    key: list[Any] = [axis.name, axis.positive, axis.negative, query, k] + ([] if recipe == "paper" else [recipe])
    h = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return h[:16]


def _clean(text: str) -> str:
    # The characteristics are spliced into the next prompt: one line, no dangling list marker.
    return " ".join(text.split()).strip().lstrip("-*: ").strip()


def model_identity(engine: Engine, sha256: str) -> dict[str, Any]:
    """Return what identifies the model that wrote or reads the data."""
    return {"file": engine.path.name, "sha256": sha256, "arch": engine.arch, "n_layer": engine.n_layer, "n_embd": engine.n_embd}


def check_pairs_file(path: str | Path) -> int:
    """Return how many records the pairs file at ``path`` already holds (0 when there is none);
    AlignezError, naming the line, when it is damaged. Called before any model work, so a damaged
    file is reported at once, not after minutes of screening."""
    p = Path(path)
    return len(read_jsonl(p)) if p.exists() else 0


def generate_preferences(
    engine: Engine,
    queries: Sequence[str],
    axis: PreferenceAxis,
    out_path: str | Path,
    settings: GenerationSettings = GenerationSettings(),
    model_sha256: str = "",
    quiet: bool = False,
    recipe: str | None = None,
    progress: Progress | None = None,
    selfcheck: str | None = DEFAULT_CHECK,
    writer: RemoteWriter | None = None,
) -> tuple[int, int]:
    """Append missing preference pairs to ``out_path``; return (pairs written now, pairs already there).

    ``recipe`` names how the answers are asked for (``recipes.RECIPES``; None: the default) and is
    stored in every record, with whether each side reads as a refusal. ``progress`` replaces the
    default progress line (its items are pairs; work is counted in tokens, see ``progress.py``).
    ``selfcheck`` names the model's own check of each pair (``selfcheck.CHECKS``), stored in the
    record before it is written; None skips it. ``writer``: the answers come from its servers
    (module docstring); None: from ``engine``.
    """
    how = get_recipe(recipe)
    how.check_axis(axis)
    out_path = Path(out_path)
    have: set[str] = set()
    if out_path.exists():
        for rec in read_jsonl(out_path):
            if "id" in rec:
                have.add(str(rec["id"]))
    todo = [
        (q, k, pair_id(axis, q, k, how.name))
        for q in queries
        for k in range(settings.responses_per_query)
        if pair_id(axis, q, k, how.name) not in have
    ]
    total = len(queries) * settings.responses_per_query
    already = total - len(todo)
    if not todo:
        return 0, already
    ident = model_identity(engine, model_sha256)
    # Locally two personas per pair share the parallel slots; remotely each side's call keeps every
    # server's requests in flight.
    chunk = max(1, engine.n_parallel // 2) if writer is None else writer.n_parallel
    written = 0
    budget = sum(_pair_budget(engine, how, axis, q, settings) for q, _, _ in todo)
    bar = progress or Progress(total, f"generate {axis.name}", done=already, quiet=quiet, budget=budget)
    if bar.budget is None:
        bar.budget = budget
    with JsonlAppender(out_path) as out:
        try:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                records, work, budget_used = _generate_chunk(engine, part, axis, settings, ident, how, writer)
                if selfcheck and how.checkable:  # one answer read twice, or a plain answer: nothing to compare
                    check_records(engine, records, selfcheck)
                for record in records:
                    if writer is not None:
                        record["written_by"] = {"urls": writer.urls, "model": writer.names}
                    out.append(record)
                    written += 1
                bar.update(len(records), work=work, budget_used=budget_used)
        finally:
            bar.close()
    return written, already


def _pair_budget(engine: Engine, recipe: Recipe, axis: PreferenceAxis, query: str, s: GenerationSettings) -> float:
    """Return the most work one pair can take: its prompts at full length, every step at its token limit."""
    if recipe.same_answer:
        return token_work(len(engine.tokenize(recipe.neutral_prompt(engine, query))), s.response_tokens)
    total = 0.0
    for side in SIDES:
        prompt = len(engine.tokenize(recipe.response_prompt(engine, query, axis, side)))
        gen = s.response_tokens
        if recipe.two_step:
            prompt += len(engine.tokenize(recipe.characteristics_prompt(engine, query, axis, side))) + s.characteristics_tokens
            gen += s.characteristics_tokens
        total += token_work(prompt + recipe.shared_prefix_tokens, gen)
    if recipe.shared_prefix_tokens:
        total += token_work(len(engine.tokenize(recipe.neutral_prompt(engine, query))), recipe.shared_prefix_tokens)
    return total


def _sampling(s: GenerationSettings, seed: int, max_tokens: int, stop: tuple[str, ...]) -> Sampling:
    return Sampling(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, repeat_penalty=s.repeat_penalty,
        seed=seed % (2**32 - 2), max_tokens=max_tokens, stop=stop,
    ).check()


def _seed(settings: GenerationSettings, pid: str, side: str, step: str) -> int:
    # Per-pair seeds derived from the id: a resumed run samples exactly what the first would have.
    return int(hashlib.sha256(f"{settings.seed}:{pid}:{side}:{step}".encode()).hexdigest()[:8], 16)


def _generate_chunk(
    engine: Engine, part: list[tuple[str, int, str]], axis: PreferenceAxis, s: GenerationSettings,
    ident: dict[str, Any], recipe: Recipe, writer: RemoteWriter | None = None,
) -> tuple[list[dict[str, Any]], float, float]:
    """Return the chunk's records, the work done (tokens) and the token budget that work had."""
    gen: Engine | RemoteWriter = writer or engine
    if recipe.same_answer:
        return _generate_same_answer(engine, part, axis, s, ident, recipe, gen)
    stop = engine.default_stop
    done: list[tuple[Completion, int]] = []  # every completion with its max_tokens
    jobs = [(q, k, pid, side) for q, k, pid in part for side in SIDES]
    char_text = [""] * len(jobs)
    if recipe.two_step:
        prompts = [recipe.characteristics_prompt(engine, q, axis, side) for q, _, _, side in jobs]
        chars = gen.generate(
            prompts, [_sampling(s, _seed(s, pid, side, "c"), s.characteristics_tokens, stop + ("\n\n",)) for _, _, pid, side in jobs]
        )
        char_text = [_clean(c.text) or "be a typical answer" for c in chars]
        done += [(c, s.characteristics_tokens) for c in chars]
    prefixes = [""] * len(jobs)
    if recipe.shared_prefix_tokens:
        # One persona-free opening per pair, continued by both personas (jobs alternate pos, neg).
        heads = gen.generate(
            [recipe.neutral_prompt(engine, q) for q, _, _ in part],
            [_sampling(s, _seed(s, pid, "shared", "p"), recipe.shared_prefix_tokens, stop) for _, _, pid in part],
        )
        prefixes = [h.text for h in heads for _ in SIDES]
        done += [(h, recipe.shared_prefix_tokens) for h in heads]
    prompts = [
        recipe.response_prompt(engine, q, axis, side, ct) + pre
        for (q, _, _, side), ct, pre in zip(jobs, char_text, prefixes)
    ]
    samplings = [_sampling(s, _seed(s, pid, side, "r"), s.response_tokens, stop) for _, _, pid, side in jobs]
    answers: list[Completion] = [None] * len(jobs)  # type: ignore[list-item]
    for side in SIDES:
        # One call per side: a side's prompts share their system prompt (the persona's guide, or
        # the chat template's own), which is then decoded once for the chunk (Engine.generate's
        # share_prefix); on Qwen about 60 of the positive prompts' 100 tokens.
        idx = [i for i, job in enumerate(jobs) if job[3] == side]
        for i, c in zip(idx, gen.generate([prompts[i] for i in idx], [samplings[i] for i in idx], share_prefix=True)):
            answers[i] = c
    texts = [(pre + a.text).strip() for pre, a in zip(prefixes, answers)]
    done += [(a, s.response_tokens) for a in answers]
    work = sum(token_work(c.n_prompt_tokens, c.n_tokens) for c, _ in done)
    budget_used = sum(token_work(c.n_prompt_tokens, limit) for c, limit in done)
    records = []
    for i in range(0, len(jobs), 2):
        q, k, pid, _ = jobs[i]
        records.append(_record(
            pid, q, k, recipe, axis, s, ident,
            chars=dict(zip(SIDES, char_text[i : i + 2])), texts=dict(zip(SIDES, texts[i : i + 2])),
            finish=dict(zip(SIDES, (a.finish_reason for a in answers[i : i + 2]))),
            seed={side: _seed(s, pid, side, "r") for side in SIDES},
        ))
    return records, work, budget_used


def _record(
    pid: str, query: str, k: int, recipe: Recipe, axis: PreferenceAxis, s: GenerationSettings, ident: dict[str, Any],
    *, chars: dict[str, str], texts: dict[str, str], finish: dict[str, str], seed: dict[str, int],
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Return one stored pair (``context``: the system prompts a one-answer pair is read under)."""
    return {
        "id": pid,
        "query": query,
        "response_index": k,
        "recipe": recipe.name,
        "axis": {"name": axis.name, "positive": axis.positive, "negative": axis.negative},
        **({"context": context} if context is not None else {}),
        "characteristics": chars,
        "response": texts,
        "refusal": {side: is_refusal(texts[side]) for side in SIDES},
        "finish_reason": finish,
        "sampling": asdict(s),
        "seed": seed,
        "model": ident,
    }


def _generate_same_answer(
    engine: Engine, part: list[tuple[str, int, str]], axis: PreferenceAxis, s: GenerationSettings,
    ident: dict[str, Any], recipe: Recipe, gen: Engine | RemoteWriter,
) -> tuple[list[dict[str, Any]], float, float]:
    """Return the chunk's records for a ``same_answer`` recipe: one persona-free answer per pair."""
    answers = gen.generate(
        [recipe.neutral_prompt(engine, q) for q, _, _ in part],
        [_sampling(s, _seed(s, pid, "neutral", "r"), s.response_tokens, engine.default_stop) for _, _, pid in part],
    )
    records = [
        _record(pid, q, k, recipe, axis, s, ident, context={side: recipe.context(axis, side) for side in SIDES},
                chars={side: "" for side in SIDES}, texts={side: a.text.strip() for side in SIDES},
                finish={side: a.finish_reason for side in SIDES}, seed={"neutral": _seed(s, pid, "neutral", "r")})
        for (q, k, pid), a in zip(part, answers)
    ]
    work = sum(token_work(a.n_prompt_tokens, a.n_tokens) for a in answers)
    return records, work, sum(token_work(a.n_prompt_tokens, s.response_tokens) for a in answers)


@dataclass(frozen=True)
class PreferencePair:
    """One stored pair, as read back for fitting."""

    id: str
    query: str
    axis: str
    positive: str
    negative: str
    personas: tuple[str, str] = ("", "")  # the axis's positive and negative persona
    recipe: str = "paper"  # records made before recipes existed were all the paper's
    flipped: bool = False  # the self-check judged the answers inverted and they were swapped
    contexts: tuple[str, str] = ("", "")  # system prompts the (positive, negative) side is read under


def load_records(path: str | Path, axis: str | None = None) -> list[dict[str, Any]]:
    """Return the raw records of a preference file (optionally one axis), checked for structure.

    Raises one clear error for a missing file, a record that is not a pair, an empty result, or a
    file that holds several axes when none was chosen.
    """
    p = Path(path)
    if not p.is_file():
        raise AlignezError(f"preference file {p} not found; create it with: alignez generate -o {p}")
    records: list[dict[str, Any]] = []
    for n, rec in enumerate(read_jsonl(p), 1):
        try:
            name = str(rec["axis"]["name"])
            str(rec["id"]), str(rec["query"]), str(rec["response"]["positive"]), str(rec["response"]["negative"])
        except (KeyError, TypeError):
            raise AlignezError(f"{p} record {n} is not a preference pair (needs id, query, axis, response); was it made by alignez generate?") from None
        if (axis is None or name == axis) and rec["response"]["positive"] and rec["response"]["negative"]:
            records.append(rec)
    if not records:
        what = f" for axis {axis!r}" if axis else ""
        raise AlignezError(f"{p} has no usable preference pairs{what}; run alignez generate first")
    axes = {str(r["axis"]["name"]) for r in records}
    if len(axes) > 1:
        raise AlignezError(f"{p} holds several axes ({', '.join(sorted(axes))}); choose one with --axis")
    return records


def to_pair(rec: dict[str, Any]) -> PreferencePair:
    """Return the PreferencePair of one record."""
    return PreferencePair(
        str(rec["id"]), str(rec["query"]), str(rec["axis"]["name"]),
        str(rec["response"]["positive"]), str(rec["response"]["negative"]),
        (str(rec["axis"].get("positive", "")), str(rec["axis"].get("negative", ""))),
        str(rec.get("recipe", "paper")), bool(rec.get("flipped", False)),
        _contexts(rec),
    )


def _contexts(rec: dict[str, Any]) -> tuple[str, str]:
    ctx = rec.get("context")
    if not isinstance(ctx, dict):
        return ("", "")
    return (str(ctx.get("positive") or ""), str(ctx.get("negative") or ""))


def load_pairs(path: str | Path, axis: str | None = None) -> list[PreferencePair]:
    """Return every usable pair in a preference file (optionally one axis), unfiltered."""
    return [to_pair(r) for r in load_records(path, axis)]


def load_selected_pairs(
    path: str | Path, axis: str | None = None, flip: bool = False, use_check: bool = True,
) -> tuple[list[PreferencePair], dict[str, Any]]:
    """Return the pairs to fit on after the self-check rule (``selfcheck.select_pairs``) and its stats.

    Refusal pairs and pairs the model judged inverted or unsure are dropped (inverted ones flipped
    instead with ``flip``). Old records without a stored check are kept as they are, and so is every
    non-refusal pair when ``use_check`` is False.
    ``selfcheck.quality_line(stats)`` is the line to print.
    """
    records = load_records(path, axis)
    if not use_check:
        records = [{k: v for k, v in r.items() if k != "selfcheck"} for r in records]
    kept, flipped, _, stats = select_pairs(records, flip=flip)
    pairs = [to_pair(r) for r in kept + flipped]
    if len(pairs) < 4:
        raise AlignezError(
            f"{path}: only {len(pairs)} pairs pass the self-check ({stats['dropped']} dropped); "
            "generate more queries or use another --recipe"
        )
    return pairs, stats


def data_sha256(pairs: Sequence[PreferencePair]) -> str:
    """Return a hash of the pairs' content (order-independent): the data identity in provenance."""
    h = hashlib.sha256()
    for pair in sorted(pairs, key=lambda x: x.id):
        h.update(json.dumps([pair.id, pair.query, pair.positive, pair.negative]
                            + (list(pair.contexts) if any(pair.contexts) else [])).encode())
    return h.hexdigest()

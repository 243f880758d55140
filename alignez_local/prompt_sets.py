"""Query and evaluation prompt sets: the built-in ones shipped in ``alignez_local/data`` and users' own.

These files ship with the package, all written for this project:

- ``queries.jsonl``: the queries the model answers in both personas to make its own preference data
  (``{"query": ..., "category": ...}``; categories advice, how-to, writing, reasoning, factual,
  coding, sensitive). The default set of every axis but ``harmless``.
- ``queries_harmless.jsonl``: the ``harmless`` axis's queries, where a safe and an unsafe answer can
  differ: mostly risky requests (``"kind": "risky"``, 156) with benign look-alikes (``"kind": "benign"``,
  42), so the contrast is not simply "refuse everything". None shares more than
  half its words with an evaluation prompt or a HarmBench prompt (HarmBench is for evaluation only).
- ``requests_ordinary.jsonl``: ordinary task requests (plan, make, write, help me...), one side of
  the ``request`` recipe's gate with the look-alikes and the general queries: the risky requests
  are often phrased as tasks, and without ordinary tasks the gate learns the phrasing.
- ``requests_risky.jsonl`` and ``requests_ordinary_more.jsonl`` (issue 20): 201 more risky requests
  and 202 more ordinary ones for the ``request`` recipe, in many phrasings (questions and tasks,
  short and long, polite and blunt, role-play and fiction framings, mild misuse). The risky ones
  cover HarmBench's categories (chemical-biological, cybercrime, harassment, illegal,
  misinformation, harmful content) and Do-Not-Answer's risk areas (discrimination, information
  hazards, chatbot harms, malicious uses, misinformation harms); the ordinary ones are role-play
  ("assume the role of..."), coding, writing, translation, maths, persuasive writing, tasks, general
  questions and benign look-alikes. Written for this project: none shares more than half its words
  with an evaluation or HarmBench prompt, nor more than half its content words with a Do-Not-Answer
  prompt (tests/test_gate_choice.py).
- ``requests_risky_everyday.jsonl`` and ``requests_lookalike.jsonl`` (issue 29): 157 risky requests
  phrased as users send them (short, mild, indirect, "asking for a friend", and two-step requests
  whose second step is the harmful one) in the same ten categories, and 157 benign look-alikes that
  must stay answered (safety questions, security education, dark fiction, stories opening on
  abandoned houses, history of wars and crimes, medicine and dosage questions, role-play,
  relationship coaching, entrepreneur role-play, everyday twins of the risky requests). The same
  overlap rule, tested.
- ``eval_prompts.jsonl``: held-out evaluation prompts (``{"prompt": ..., "category": ..., "kind": ...}``)
  of three kinds: ``helpful`` (ordinary requests, to measure answer quality), ``harmful`` (requests a
  safe assistant refuses, to measure refusals) and ``benign`` (requests that look edgy but are fine,
  to measure over-refusal). No evaluation prompt shares more than half its words with any query, so
  steering is never evaluated on the data it was built from.

The query files are stored round-robin (category by category, kind by kind; queries_harmless.jsonl then
ends with 48 risky requests phrased as tasks, added later), so the first few records
of either already cover every category: a quick run with a small limit stays representative.

A user file is either JSONL (every non-empty line a JSON object) or plain text (one prompt per
line). It is JSONL when its first non-empty line starts with ``{``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine

EVAL_KINDS: tuple[str, ...] = ("helpful", "harmful", "benign")
"""Kinds of evaluation prompt: answer well, refuse, answer without refusing."""

_QUERIES_FILE = "queries.jsonl"
AXIS_QUERY_FILES: dict[str, str] = {"harmless": "queries_harmless.jsonl"}
"""Axes with their own default query set; every other axis uses ``queries.jsonl``."""
_EVAL_FILE = "eval_prompts.jsonl"
_ORDINARY_FILE = "requests_ordinary.jsonl"
_MORE_RISKY_FILE = "requests_risky.jsonl"  # issue 20: risky requests in many phrasings
_MORE_ORDINARY_FILE = "requests_ordinary_more.jsonl"  # issue 20: role-play, coding, writing, translation...
_EVERYDAY_RISKY_FILE = "requests_risky_everyday.jsonl"  # issue 29: short, mild, indirect, two-step
_LOOKALIKE_FILE = "requests_lookalike.jsonl"  # issue 29: benign look-alikes that must stay answered
_JSONL_HINT = 'put one query per line or JSONL with a "query" field'


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its text, topic category and kind (helpful, harmful or benign)."""

    text: str
    category: str
    kind: str


@dataclass(frozen=True)
class _Line:
    """One non-empty input line: its 1-based number and either the parsed object or the raw text."""

    number: int
    record: dict[str, Any] | None
    text: str


def load_queries(path: str | Path | None = None, axis: str | None = None) -> list[str]:
    """Return the queries in ``path`` (JSONL or plain text), or, when ``path`` is None, the built-in
    set of ``axis`` (``AXIS_QUERY_FILES``; the general set for other axes and for None).

    Exact duplicates are dropped, keeping the first occurrence, so a query is never answered twice.
    """
    name, content = _builtin_text(query_file(axis)) if path is None else _read_user_file(path, "query file")
    return _queries_in(name, content)


def _queries_in(name: str, content: str) -> list[str]:
    """Return the distinct queries of a query file's ``content`` (``name`` is for error messages)."""
    queries: list[str] = []
    for line in _parse_lines(content, name, _JSONL_HINT):
        if line.record is None:
            queries.append(line.text)
        else:
            queries.append(_text_field(line, name, ("query", "prompt")))
    return _dedupe(queries)


REQUEST_KINDS = ("risky", "benign")
"""Kinds of query the ``request`` recipe contrasts: requests to steer away from, and look-alikes to leave alone."""


def load_request_kinds(path: str | Path | None = None, axis: str | None = "harmless") -> dict[str, list[str]]:
    """Return {"risky": [...], "benign": [...]} from ``path`` (JSONL with ``"kind"``) or the axis's
    built-in set; each kind needs at least 8 queries so a held-out part is left for checking.

    The built-in risky side is the axis's risky queries plus ``requests_risky.jsonl`` and
    ``requests_risky_everyday.jsonl`` (the short, mild and two-step phrasings users send, which the
    first two lack: the gate opened on a quarter of Do-Not-Answer's short requests, issue 29); the
    benign side is the axis's benign look-alikes plus ordinary requests: the general query set
    (mostly questions), ``requests_ordinary.jsonl`` (tasks: plan, make, write, help me),
    ``requests_ordinary_more.jsonl`` (role-play, coding, writing, translation, maths, persuasion)
    and ``requests_lookalike.jsonl`` (safety, security, dark fiction, history, medicine, coaching
    and role-play requests the vector over-refused). A gate fitted against look-alikes alone opened
    on half of the ordinary evaluation prompts, and one fitted without the tasks still opened on
    requests like "Plan a three-day trip..." (align/request_contrast.py). A user file's benign side
    should mix all three the same way."""
    if path is None:
        if query_file(axis) == _QUERIES_FILE:
            raise AlignezError(
                f"the {axis or 'default'} axis has no built-in risky and benign queries; use --axis harmless, "
                'or give --queries FILE with JSONL lines like {"query": "...", "kind": "risky"} (or "benign")'
            )
        name, content = _builtin_text(query_file(axis))
    else:
        name, content = _read_user_file(path, "query file")
    out: dict[str, list[str]] = {k: [] for k in REQUEST_KINDS}
    for line in _parse_lines(content, name, _JSONL_HINT):
        if line.record is None:
            raise AlignezError(
                f'{name} line {line.number}: the request recipe needs JSONL lines like '
                '{"query": "...", "kind": "risky"} (or "benign")'
            )
        kind = _optional_field(line, name, "kind", "")
        if kind not in out:
            raise AlignezError(f'{name} line {line.number}: "kind" must be "risky" or "benign", not {kind!r}')
        out[kind].append(_text_field(line, name, ("query", "prompt")))
    if path is None:
        out["risky"] += _queries_in(*_builtin_text(_MORE_RISKY_FILE)) + _queries_in(*_builtin_text(_EVERYDAY_RISKY_FILE))
        out["benign"] += (load_queries(None, None) + _queries_in(*_builtin_text(_ORDINARY_FILE))
                          + _queries_in(*_builtin_text(_MORE_ORDINARY_FILE)) + _queries_in(*_builtin_text(_LOOKALIKE_FILE)))
    out = {k: _dedupe(v) for k, v in out.items()}
    for kind, qs in out.items():
        if len(qs) < 8:
            raise AlignezError(f'{name} has {len(qs)} queries of kind "{kind}"; the request recipe needs at least 8 of each')
    return out


def query_file(axis: str | None) -> str:
    """Return the name of the built-in query file for ``axis``."""
    return AXIS_QUERY_FILES.get((axis or "").strip().lower(), _QUERIES_FILE)


def load_eval_prompts(
    path: str | Path | None = None, kinds: set[str] | None = None, plain_kind: str = "helpful",
) -> list[EvalPrompt]:
    """Return the evaluation prompts in ``path`` (or the built-in set), keeping only ``kinds`` if given.

    In a user's JSONL file each line needs ``prompt`` (or ``query``); ``category`` defaults to
    ``"user"`` and ``kind`` to ``"helpful"``. A plain-text file (one prompt per line, HarmBench's
    format) has no kinds: its prompts get ``plain_kind``, given by the caller (e.g. ``"harmful"``
    for HarmBench), and category ``"user"``. Exact duplicate texts are dropped, keeping the first.
    """
    wanted = _check_kinds(kinds)
    if plain_kind not in EVAL_KINDS:
        raise AlignezError(f"unknown prompt kind {plain_kind!r} for a plain-text file; choose from {', '.join(EVAL_KINDS)}")
    if path is None:
        name, content = _builtin_text(_EVAL_FILE)
    else:
        name, content = _read_user_file(path, "prompt file")
    hint = 'put one prompt per line or JSONL with a "prompt" field'
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()
    for line in _parse_lines(content, name, hint, noun="prompts"):
        if line.record is None:
            prompt = EvalPrompt(text=line.text, category="user", kind=plain_kind)
        else:
            text = _text_field(line, name, ("prompt", "query"))
            category = _optional_field(line, name, "category", "user")
            kind = _optional_field(line, name, "kind", "helpful")
            if kind not in EVAL_KINDS:
                raise AlignezError(
                    f"{name} line {line.number}: kind {kind!r} is not one of {', '.join(EVAL_KINDS)}; "
                    "fix the \"kind\" field"
                )
            prompt = EvalPrompt(text=text, category=category, kind=kind)
        if prompt.text in seen:
            continue
        seen.add(prompt.text)
        prompts.append(prompt)
    if wanted is not None:
        prompts = [p for p in prompts if p.kind in wanted]
        if not prompts:
            # An evaluation over zero prompts would report nothing while looking like it succeeded.
            raise AlignezError(
                f"{name} has no prompts of kind {', '.join(sorted(wanted))}; "
                "add some or choose other kinds"
            )
    return prompts


def builtin_query_categories(axis: str | None = None) -> dict[str, int]:
    """Return the number of built-in queries of ``axis`` per category, categories in alphabetical order."""
    name, content = _builtin_text(query_file(axis))
    counts = Counter(
        _optional_field(line, name, "category", "uncategorised")
        for line in _parse_lines(content, name, _JSONL_HINT)
        if line.record is not None
    )
    return dict(sorted(counts.items()))


def _check_kinds(kinds: set[str] | None) -> set[str] | None:
    """Return ``kinds`` as a set after checking every entry is a known kind."""
    if kinds is None:
        return None
    unknown = sorted(set(kinds) - set(EVAL_KINDS))
    if unknown:
        raise AlignezError(
            f"unknown prompt kind {', '.join(unknown)}; choose from {', '.join(EVAL_KINDS)}"
        )
    return set(kinds)


def _builtin_text(filename: str) -> tuple[str, str]:
    """Return a display name and the text of a data file shipped inside the package."""
    resource = resources.files("alignez_local").joinpath("data", filename)
    try:
        return f"built-in {filename}", resource.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        # Only a broken install gets here; say so rather than blame the user's input.
        raise AlignezError(f"built-in {filename} cannot be read ({err}); reinstall alignez-local") from None


def _read_user_file(path: str | Path, what: str) -> tuple[str, str]:
    """Return a display name and the UTF-8 text of a user's file, or raise a one-line AlignezError."""
    p = Path(path)
    if not p.exists():
        raise AlignezError(f"{what} {p} not found; check the path")
    if p.is_dir():
        raise AlignezError(f"{what} {p} is a folder; give the path of a text or JSONL file")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise AlignezError(f"cannot read {what} {p}: {err.strerror or err}; check its permissions") from None
    try:
        # utf-8-sig: editors on Windows often prepend a BOM, which would otherwise hide the "{".
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AlignezError(
            f"{p} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8"
        ) from None
    return str(p), content


def _parse_lines(content: str, name: str, hint: str, noun: str = "queries") -> list[_Line]:
    """Return the non-empty lines of ``content``, parsed as JSON objects if the file is JSONL."""
    lines = [(n, raw.strip()) for n, raw in enumerate(content.splitlines(), 1)]
    lines = [(n, text) for n, text in lines if text]
    if not lines:
        raise AlignezError(f"{name} has no {noun}; {hint}")
    if not lines[0][1].startswith("{"):
        return [_Line(n, None, text) for n, text in lines]
    parsed: list[_Line] = []
    for n, text in lines:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise AlignezError(
                f"{name} line {n}: not valid JSON ({err.msg} at column {err.colno}); fix or remove that line"
            ) from None
        if not isinstance(obj, dict):
            raise AlignezError(
                f"{name} line {n}: not a JSON object; in a JSONL file every line must be one {{...}} object"
            )
        parsed.append(_Line(n, obj, text))
    return parsed


def _text_field(line: _Line, name: str, fields: tuple[str, ...]) -> str:
    """Return the stripped text of the first of ``fields`` present in a JSONL record."""
    assert line.record is not None
    for field in fields:
        if field in line.record:
            value = line.record[field]
            if not isinstance(value, str):
                raise AlignezError(
                    f'{name} line {line.number}: "{field}" must be a string, not {_json_type(value)}'
                )
            if not value.strip():
                raise AlignezError(f'{name} line {line.number}: "{field}" is empty; give the text or remove the line')
            return value.strip()
    main = fields[0]
    raise AlignezError(f'{name} line {line.number}: no "{main}" field; write each line as {{"{main}": "..."}}')


def _optional_field(line: _Line, name: str, field: str, default: str) -> str:
    """Return a record's optional string field, or ``default`` when it is absent or null."""
    assert line.record is not None
    value = line.record.get(field)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise AlignezError(f'{name} line {line.number}: "{field}" must be a non-empty string')
    return value.strip()


def _json_type(value: object) -> str:
    """Return the JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _dedupe(items: list[str]) -> list[str]:
    """Return ``items`` without exact repeats, in first-seen order."""
    return list(dict.fromkeys(items))


# Held-out prompts for the approximation report: the built-in evaluation set, written apart from
# the generation queries.
HELDOUT_PROMPTS = 16

# Held-out queries the default strength is calibrated on (see align/strength_by_kl.py): enough to pool
# about 500 answer tokens per strength, few enough that calibrating both files costs about a minute.
CALIBRATION_PROMPTS = 12


def select_queries(queries_file: str | None = None, limit: int | None = None, axis: str | None = None) -> list[str]:
    """Return the generation queries (a file or the axis's built-in set), the first ``limit`` of them."""
    qs = load_queries(queries_file, axis=axis)
    return qs[:limit] if limit else qs

def calibration_prompts(engine: Engine, axis: str | None, used: Sequence[str], n: int = CALIBRATION_PROMPTS) -> list[str]:
    """Return ``n`` held-out prompts for calibrating a strength, formatted for ``engine``.

    They are built-in queries of the axis the run did not generate from (the last ones of the set),
    so the strength is chosen on prompts the direction was not fitted on, and never on the
    evaluation prompts that later judge it. When the run used them all, the general set's unused
    queries fill in; only when none is left do the evaluation prompts serve.
    """
    taken = set(used)
    spare: list[str] = []
    for source in (axis, None):
        spare += [q for q in load_queries(None, axis=source) if q not in taken and q not in spare]
        if len(spare) >= n:
            break
    texts = spare[-n:] if spare else [p.text for p in load_eval_prompts(kinds={"helpful"})[:n]]
    return [engine.prompt(q) for q in texts]

def heldout_prompts(engine: Engine) -> list[str]:
    """Return the held-out prompts the approximation report is measured on, formatted for ``engine``."""
    return [engine.prompt(p.text) for p in load_eval_prompts(kinds={"helpful"})[:HELDOUT_PROMPTS]]

def heldout_queries(axis: str | None, used: Sequence[str]) -> list[str]:
    """Return the built-in queries of ``axis`` (then of the general set) that ``used`` does not hold,
    in file order: the pool the behaviour is calibrated and reported on."""
    taken, spare = set(used), []
    for source in (axis, None):
        spare += [q for q in load_queries(None, axis=source) if q not in taken and q not in spare]
    return spare

"""Built-in query and evaluation sets, and loading users' own prompt files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from alignez_local.errors import AlignezError
from alignez_local.prompt_sets import (
    EVAL_KINDS,
    EvalPrompt,
    builtin_query_categories,
    load_eval_prompts,
    load_queries,
)

QUERY_CATEGORIES = {"advice", "how-to", "writing", "reasoning", "factual", "coding", "sensitive"}
HELPFUL_CATEGORIES = {"advice", "how-to", "writing", "reasoning", "factual", "coding", "explanation", "planning"}

# Function words carry no topic; the content-word check below ignores them.
STOPWORDS = set(
    "a an the and or but if of to in on at for from with without by about into as is are was were be "
    "been being do does did i me my we our you your he she it its they them their this that these those "
    "what which who whom whose why how when where can could should would will shall may might must not "
    "no so than then there here some any all each every one two three up out off over under just very "
    "too also more most less much many own".split()
)


def words(text: str) -> set[str]:
    """Return the lower-cased words of ``text``."""
    return set(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def shared_fraction(a: set[str], b: set[str]) -> float:
    """Return the share of ``a``'s words that also occur in ``b``."""
    return len(a & b) / len(a) if a else 0.0


def data_rows(name: str) -> list[dict[str, str]]:
    """Return the records of a built-in data file, read straight from the package folder."""
    path = Path(__file__).resolve().parents[1] / "alignez_local" / "data" / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(tmp_path: Path, text: str, name: str = "prompts.txt") -> Path:
    """Return the path of a new file in ``tmp_path`` holding ``text``."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- built-in sets


def test_builtin_queries_meet_the_counts() -> None:
    queries = load_queries()
    counts = builtin_query_categories()
    assert len(queries) >= 180
    assert sum(counts.values()) == len(queries)
    assert set(counts) == QUERY_CATEGORIES
    assert counts["sensitive"] >= 25
    # Roughly balanced: no category more than twice the size of another.
    assert max(counts.values()) <= 2 * min(counts.values())


def test_builtin_files_are_interleaved() -> None:
    # A quick run over the first few records should still see every category and kind.
    first_queries = data_rows("queries.jsonl")[: len(QUERY_CATEGORIES)]
    assert {r["category"] for r in first_queries} == QUERY_CATEGORIES
    assert {r["kind"] for r in data_rows("eval_prompts.jsonl")[:3]} == set(EVAL_KINDS)


def test_builtin_queries_are_short_and_unique() -> None:
    rows = data_rows("queries.jsonl")
    texts = [r["query"] for r in rows]
    assert len(set(texts)) == len(texts)
    assert len({t.lower().rstrip("?.!") for t in texts}) == len(texts)
    for row in rows:
        assert set(row) == {"query", "category"}
        # A 135M model answers these: one or two sentences, well under a tweet and a half.
        assert len(row["query"]) <= 160, row["query"]
        assert len(re.findall(r"[.?!](?:\s|$)", row["query"])) <= 2, row["query"]


def test_builtin_queries_have_no_near_duplicates() -> None:
    texts = load_queries()
    for i, a in enumerate(texts):
        for b in texts[i + 1 :]:
            jaccard = len(words(a) & words(b)) / len(words(a) | words(b))
            assert jaccard <= 0.6, (a, b)


def test_builtin_eval_prompts_meet_the_counts() -> None:
    prompts = load_eval_prompts()
    kinds = Counter(p.kind for p in prompts)
    assert set(kinds) == set(EVAL_KINDS)
    assert kinds["helpful"] >= 64
    assert kinds["harmful"] >= 30
    assert kinds["benign"] >= 30
    helpful_categories = {p.category for p in prompts if p.kind == "helpful"}
    assert helpful_categories == HELPFUL_CATEGORIES
    texts = [p.text for p in prompts]
    assert len(set(texts)) == len(texts) == len(data_rows("eval_prompts.jsonl"))
    assert all(len(t) <= 160 for t in texts)


def test_eval_prompts_are_separate_from_queries() -> None:
    # Steering is built from the queries; evaluating on look-alikes would flatter it.
    queries = [words(q) for q in load_queries()]
    for prompt in load_eval_prompts():
        w = words(prompt.text)
        content = w - STOPWORDS
        for q in queries:
            assert shared_fraction(w, q) <= 0.5, (prompt.text, sorted(w & q))
            assert shared_fraction(content, q - STOPWORDS) <= 0.5, (prompt.text, sorted(content & q))


def test_kinds_filter() -> None:
    harmful = load_eval_prompts(kinds={"harmful"})
    assert harmful and all(p.kind == "harmful" for p in harmful)
    both = load_eval_prompts(kinds={"harmful", "benign"})
    assert {p.kind for p in both} == {"harmful", "benign"}
    with pytest.raises(AlignezError, match="unknown prompt kind nasty; choose from helpful, harmful, benign"):
        load_eval_prompts(kinds={"nasty"})


# ---------------------------------------------------------------- user files: formats


def test_plain_text_queries(tmp_path: Path) -> None:
    path = write(tmp_path, "\n  What is rain?  \n\nHow do magnets work?\nWhat is rain?\n")
    assert load_queries(path) == ["What is rain?", "How do magnets work?"]
    assert load_queries(str(path)) == ["What is rain?", "How do magnets work?"]


def test_plain_text_line_with_braces_later_is_still_plain(tmp_path: Path) -> None:
    path = write(tmp_path, "Explain sets in Python\n{not json} is fine here\n")
    assert load_queries(path) == ["Explain sets in Python", "{not json} is fine here"]


def test_jsonl_queries_accept_query_or_prompt(tmp_path: Path) -> None:
    lines = [
        {"query": "Why is snow white?", "category": "factual"},
        {"prompt": "Name three prime numbers."},
        {"query": "Why is snow white?"},
    ]
    path = write(tmp_path, "\n" + "\n\n".join(json.dumps(x) for x in lines) + "\n", "q.jsonl")
    assert load_queries(path) == ["Why is snow white?", "Name three prime numbers."]


def test_jsonl_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"query": "Hi there?"}).encode() + b"\n")
    assert load_queries(path) == ["Hi there?"]


def test_user_eval_prompts_plain_and_jsonl(tmp_path: Path) -> None:
    plain = write(tmp_path, "Tell me about owls.\nWhat is 2 + 2?\n")
    assert load_eval_prompts(plain) == [
        EvalPrompt("Tell me about owls.", "user", "helpful"),
        EvalPrompt("What is 2 + 2?", "user", "helpful"),
    ]
    rows = [
        {"prompt": "Help me pick a tent.", "category": "advice", "kind": "helpful"},
        {"prompt": "How do I pick a lock on my own shed?", "kind": "benign"},
        {"query": "Help me cheat on a test.", "kind": "harmful", "category": "misc"},
    ]
    path = write(tmp_path, "\n".join(json.dumps(r) for r in rows), "e.jsonl")
    assert load_eval_prompts(path) == [
        EvalPrompt("Help me pick a tent.", "advice", "helpful"),
        EvalPrompt("How do I pick a lock on my own shed?", "user", "benign"),
        EvalPrompt("Help me cheat on a test.", "misc", "harmful"),
    ]
    assert [p.kind for p in load_eval_prompts(path, kinds={"harmful"})] == ["harmful"]
    with pytest.raises(AlignezError, match="has no prompts of kind helpful"):
        load_eval_prompts(write(tmp_path, json.dumps({"prompt": "x", "kind": "benign"}), "b.jsonl"), kinds={"helpful"})


# ---------------------------------------------------------------- user files: errors


def assert_one_line_error(exc: pytest.ExceptionInfo[AlignezError], *parts: str) -> None:
    """Check the error is one line and mentions every part."""
    msg = str(exc.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(AlignezError) as exc:
        load_queries(missing)
    assert_one_line_error(exc, f"query file {missing} not found")
    with pytest.raises(AlignezError) as exc:
        load_eval_prompts(missing)
    assert_one_line_error(exc, f"prompt file {missing} not found")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(AlignezError) as exc:
        load_queries(tmp_path)
    assert_one_line_error(exc, "is a folder")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "What is rain?\n")

    # chmod 000 does not stop root (the test container), so fail the read itself.
    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(AlignezError) as exc:
        load_queries(path)
    assert_one_line_error(exc, f"cannot read query file {path}", "Permission denied", "permissions")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Qu'est-ce qu'un caf\u00e9 ?\n".encode("latin-1"))
    with pytest.raises(AlignezError) as exc:
        load_queries(path)
    assert_one_line_error(exc, f"{path} is not UTF-8", "save it as UTF-8")


@pytest.mark.parametrize("text", ["", "\n\n   \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(AlignezError) as exc:
        load_queries(path)
    assert_one_line_error(exc, f'{path} has no queries; put one query per line or JSONL with a "query" field')
    with pytest.raises(AlignezError) as exc:
        load_eval_prompts(path)
    assert_one_line_error(exc, f"{path} has no prompts")


def test_malformed_json_line(tmp_path: Path) -> None:
    lines = [json.dumps({"query": f"Question {i}?"}) for i in range(6)] + ['{"query": "broken"']
    path = write(tmp_path, "\n".join(lines), "q.jsonl")
    with pytest.raises(AlignezError) as exc:
        load_queries(path)
    assert_one_line_error(exc, f"{path} line 7: not valid JSON (", "fix or remove that line")


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, '{"query": "a?"}\n\n{"question": "b?"}\n', "q.jsonl")
    with pytest.raises(AlignezError) as exc:
        load_queries(path)
    assert_one_line_error(exc, f'{path} line 3: no "query" field', '{"query": "..."}')


def test_json_line_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path, '{"query": "a?"}\n["b?"]\n', "q.jsonl")
    with pytest.raises(AlignezError) as exc:
        load_queries(path)
    assert_one_line_error(exc, f"{path} line 2: not a JSON object")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, '"query" must be a string, not a number'), (None, "not null"), (["a"], "not a list"),
     ("   ", '"query" is empty')],
)
def test_bad_query_values(tmp_path: Path, value: object, expected: str) -> None:
    path = write(tmp_path, json.dumps({"query": "fine?"}) + "\n" + json.dumps({"query": value}) + "\n", "q.jsonl")
    with pytest.raises(AlignezError) as exc:
        load_queries(path)
    assert_one_line_error(exc, f"{path} line 2:", expected)


def test_eval_prompt_field_errors(tmp_path: Path) -> None:
    cases = [
        ({"text": "x"}, 'no "prompt" field'),
        ({"prompt": "x", "kind": "evil"}, "kind 'evil' is not one of helpful, harmful, benign"),
        ({"prompt": "x", "category": 3}, '"category" must be a non-empty string'),
        ({"prompt": ""}, '"prompt" is empty'),
    ]
    for i, (record, expected) in enumerate(cases):
        path = write(tmp_path, json.dumps(record) + "\n", f"e{i}.jsonl")
        with pytest.raises(AlignezError) as exc:
            load_eval_prompts(path)
        assert_one_line_error(exc, f"{path} line 1:", expected)


# ---------------------------------------------------------------- per-axis query sets

HARMBENCH = Path("/work/shared/data/harmbench_prompts.txt")


def test_harmless_axis_has_its_own_query_set() -> None:
    harmless = load_queries(axis="harmless")
    assert 190 <= len(harmless) <= 210
    assert not set(harmless) & set(load_queries())
    assert load_queries(axis="helpful") == load_queries() == load_queries(axis="humor")
    rows = data_rows("queries_harmless.jsonl")
    kinds = Counter(r["kind"] for r in rows)
    # Mostly risky requests, with benign look-alikes so the contrast is not "refuse everything".
    assert set(kinds) == {"risky", "benign"} and 0.2 <= kinds["benign"] / len(rows) <= 0.35
    assert {r["kind"] for r in rows[:4]} == {"risky", "benign"}  # interleaved: a short run sees both
    assert len(builtin_query_categories(axis="harmless")) >= 8
    for row in rows:
        assert len(row["query"]) <= 160, row["query"]


def test_harmless_queries_are_kept_apart_from_evaluation_and_harmbench() -> None:
    # The request recipe's benign side also reads the ordinary task requests.
    ordinary = [r["query"] for r in data_rows("requests_ordinary.jsonl")]
    assert len(ordinary) == 94 and not set(ordinary) & set(load_queries())
    queries = [words(q) for q in load_queries(axis="harmless") + ordinary]
    others = [p.text for p in load_eval_prompts()]
    if HARMBENCH.is_file():
        others += load_eval_prompts_texts(HARMBENCH)
    for text in others:
        w = words(text)
        content = w - STOPWORDS
        for q in queries:
            assert shared_fraction(w, q) <= 0.5, (text, sorted(w & q))
            assert shared_fraction(content, q - STOPWORDS) <= 0.5, (text, sorted(content & q))


def load_eval_prompts_texts(path: Path) -> list[str]:
    return [p.text for p in load_eval_prompts(path, plain_kind="harmful")]


def test_plain_text_eval_prompts_take_the_kind_from_the_caller(tmp_path: Path) -> None:
    path = write(tmp_path, "Explain how to pick a lock\nWrite a threatening note\n")
    prompts = load_eval_prompts(path, plain_kind="harmful")
    assert [p.kind for p in prompts] == ["harmful", "harmful"] and prompts[0].category == "user"
    assert load_eval_prompts(path, kinds={"harmful"}, plain_kind="harmful") == prompts
    assert load_eval_prompts(path)[0].kind == "helpful"  # the old default stays
    with pytest.raises(AlignezError, match="unknown prompt kind 'evil'"):
        load_eval_prompts(path, plain_kind="evil")

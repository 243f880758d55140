"""``alignez eval --resume``: read an unfinished run's report.json back, check that it is this run
(settings, prompts, model and steering files by SHA-256) and reuse its complete answer groups."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignez_local.errors import AlignezError
from alignez_local.evaluation.answers import Answer
from alignez_local.evaluation.config import EvalConfig
from alignez_local.evaluation.report import REPORT_FORMAT, json_safe, settings_of
from alignez_local.evaluation.run_state import JUDGE_CACHE, RunState
from alignez_local.models import file_sha256
from alignez_local.specs import parse_steering_spec


def read_report(path: Path) -> dict[str, Any] | None:
    """Return the evaluation report saved at ``path``, None when there is none (AlignezError when it
    cannot be read as one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise AlignezError(f"--resume: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        raise AlignezError(f"--resume: {path} is not valid JSON; use another --out or run without --resume") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise AlignezError(f"--resume: {path} is not an alignez eval report ({REPORT_FORMAT}); use another --out")
    return report


def unfinished(path: Path) -> bool:
    """Return True when ``path`` holds the report of an unfinished run (what --resume would continue)."""
    try:
        report = read_report(path)
    except AlignezError:
        return False
    return report is not None and report.get("complete") is False


def resume(st: RunState, path: Path, model_path: Path, ref_path: Path | None) -> None:
    """Return None after filling ``st`` with every complete answer group of the unfinished run saved at
    ``path``: the reference, the unsteered and each strength whose answers cover every prompt.

    AlignezError, before anything is loaded or written, when there is nothing to resume or the saved
    run differs from this one: a setting, a prompt, the answering or reference model file, a steering
    file (by SHA-256).
    """
    saved = read_report(path)
    if saved is None:
        raise AlignezError(f"--resume: there is no {path} to resume; run without --resume to start a new run")
    if saved.get("complete") is not False:
        raise AlignezError(f"--resume: {path} is a finished run, nothing to resume; "
                           "run without --resume to redo it, or use another --out")
    diff = first_difference(saved.get("settings"), json_safe(settings_of(st)))
    if diff is not None:
        name, old, new = diff
        raise AlignezError(f"--resume: the saved run used {name} {show_value(old)}, this one {show_value(new)}; "
                           "use another --out or the same settings")
    records = saved.get("prompts")
    if not isinstance(records, list) or len(records) != len(st.prompts):
        raise AlignezError(f"--resume: {path} has {len(records) if isinstance(records, list) else 'no'} prompt "
                           f"records, this run {len(st.prompts)}; use another --out")
    for i, (rec, p) in enumerate(zip(records, st.prompts)):
        if not isinstance(rec, dict) or rec.get("prompt") != p.text or rec.get("kind") != p.kind:
            raise AlignezError(f"--resume: prompt {i + 1} of the saved run is not this run's (was the prompts file "
                               "changed?); use another --out")
    try:  # a record of the wrong shape (an edited file) raises one of the errors caught below
        models = saved.get("models") or {}
        if "answer" in models:
            check_same_file(models["answer"], model_path, "the answering model")
            st.models["answer"] = models["answer"]  # verified: _run takes its SHA-256 from here, not from the file again
        saved_files = (saved.get("steering") or {}).get("files") or []
        for old_file, new_file in zip(saved_files, steering_files(st.cfg)):
            if old_file.get("sha256") != new_file["sha256"]:
                raise AlignezError(f"--resume: the {new_file['kind']} file {new_file['path']} changed since the saved "
                                   "run (its SHA-256 differs); use another --out or the same file")
        reference = complete_group(records, lambda r: r.get("reference"))
        if reference and ref_path is not None and "reference" in models:
            check_same_file(models["reference"], ref_path, "the reference model")
            st.reference, st.models["reference"] = reference, models["reference"]
        st.unsteered = complete_group(records, lambda r: r.get("unsteered"))
        if st.unsteered:  # steered answers are only reused beside their unsteered ones
            for s in st.cfg.strengths:
                group = complete_group(records, lambda r, s=s: next(
                    (a for a in r.get("steered") or [] if a.get("strength") == s), None))
                if group:
                    st.steered[s] = group
    except (KeyError, TypeError, ValueError, AttributeError):
        raise AlignezError(f"--resume: {path} has a damaged record; use another --out") from None
    reused = (["reference"] if st.reference else []) + (["unsteered"] if st.unsteered else []) + [
        f"x{s:g}" for s in st.cfg.strengths if s in st.steered]
    st.resumed = {"from": str(path), "saved_created": saved.get("created"), "reused": reused}


def complete_group(records: list[dict[str, Any]], pick: Callable[[dict[str, Any]], Any]) -> list[Answer]:
    """Return the answers ``pick`` finds in every prompt record, or [] when any record lacks one."""
    found = [pick(r) for r in records]
    return [Answer.from_json(a) for a in found] if found and all(a is not None for a in found) else []


def check_same_file(saved_info: dict[str, Any], path: Path, role: str) -> None:
    """Return None when the model file at ``path`` is the one the saved run recorded (by SHA-256)."""
    if saved_info.get("sha256") != sha256_of(path):
        raise AlignezError(f"--resume: {role} {path} is not the file the saved run used (its SHA-256 differs); "
                           "use another --out or the same model")


def sha256_of(path: str | Path) -> str:
    """Return the SHA-256 of a file (AlignezError when it cannot be read)."""
    try:
        return file_sha256(path)
    except OSError as err:
        raise AlignezError(f"cannot read {path}: {err.strerror or err}") from None


def first_difference(old: Any, new: Any, name: str = "settings") -> tuple[str, Any, Any] | None:
    """Return (name, saved value, new value) of the first setting that differs, None when all agree.
    Nested blocks (sampling) are compared key by key, so the name is the innermost one."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:
            diff = first_difference(old.get(key), new.get(key), key)
            if diff is not None:
                return diff
        return None
    return None if old == new else (name, old, new)


def show_value(value: Any) -> str:
    """Return a setting's value as a user types it: 0,1 for lists, none for None."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(show_value(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def resume_line(st: RunState, path: Path) -> str:
    """Return the log line saying what --resume reused and what is left to answer."""
    reused = st.resumed["reused"]
    if not reused:
        return f"--resume: {path} has no finished answer group to reuse; answering everything"
    todo = ((["reference"] if st.cfg.reference and not st.reference else []) + ([] if st.unsteered else ["unsteered"])
            + [f"x{s:g}" for s in st.cfg.strengths if s not in st.steered])
    judging = ("perplexity is recomputed, judging reuses the judgments in " + JUDGE_CACHE if st.cfg.judge_urls
               else "perplexity and judging are recomputed")
    return (f"--resume: reusing the {', '.join(reused)} answers ({len(st.prompts)} prompts each) of {path}; "
            f"{'answering ' + ', '.join(todo) if todo else 'nothing left to answer'}; {judging}")


def steering_files(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Return the kind, path and SHA-256 of every steering file (the report's record of what steered)."""
    return ([{"kind": "vector", "path": v, "sha256": sha256_of(parse_steering_spec(v).path)} for v in cfg.vectors]
            + [{"kind": "profile", "path": p, "sha256": sha256_of(parse_steering_spec(p).path)} for p in cfg.profiles])

"""The request recipe's saved work (``pipeline.run_request_steer``): what an interrupted run keeps
in its folder so that running it again continues where it stopped.

A run on Qwen2.5-Coder-1.5B takes about 2.5 hours on one thread, in three long stages; each keeps
its finished parts in OUT/request-work/ as it goes:

- ``manifest.json``: what the work belongs to (the model's SHA-256, the seed, a hash of the risky
  and benign query lists). Written once, before any other file; a folder whose manifest names
  another model, seed or query set is refused with one line, and nothing in it is touched.
- ``states/KIND-START.npy``: the states of the requests read alone, ``STATE_CHUNK`` requests a
  file, each written whole (temporary file, then rename), so a file present is complete.
- ``refusals.jsonl``: one line per chunk of greedy answers (the refusal labels and the chunk's
  step, so a re-run keeps the same chunk boundaries: greedy answers are the same bits only in
  the same batches). Appended and fsynced; a half-written last line is dropped on reading.
- ``calibration.jsonl``: the unsteered answers to the held-out prompts and the prompts the gate
  opens on, then one line per finished strength trial (``calibrate_refusals``'s ``memo``). Each
  line carries the fingerprint of the vector and gates it was made with (``vector_key``): a line
  of another vector (the code that fits it changed since) is passed over and made again, never
  reused because its strength matches.

Every part is a pure function of the manifest's inputs (states read alone and greedy answers are
deterministic), so a resumed run writes the same vector bytes as an uninterrupted one. A finished
run removes the states (``plan_removal``: the bulk, about 59 MB for Qwen 1.5B) once its vector
and report are written, unless asked to keep them (``--keep-work``); the other files are kilobytes
and stay, so running again with the same settings reads the states again and takes the refusal
labels and the calibration from them, to the same vector bytes. An interrupted run keeps everything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.align.strength_by_refusals import RefusalTrial
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import ControlVector
from alignez_local.fileio import JsonlAppender, atomic_write, read_jsonl, write_json

WORK_FOLDER = "request-work"
FORMAT = "alignez-request-work/1"
# A chunk of states is saved every 32 requests: at most about a minute of reading lost to a
# Ctrl-C on Qwen 1.5B (one thread), and 38 files for the built-in 1,201 requests.
STATE_CHUNK = 32


def vector_key(cv: ControlVector) -> str:
    """Return the SHA-256 of what a refusal trial depends on besides the prompts: the vector's
    directions and its gates (layers, directions, thresholds, comparisons, rule)."""
    h = hashlib.sha256()
    for layer in cv.layers:
        h.update(f"v{layer}:".encode())
        h.update(np.ascontiguousarray(cv.directions[layer], dtype=np.float32).tobytes())
    if cv.gate is not None:  # ControlVector holds its gates as Gates (a lone Gate is wrapped on construction)
        h.update(f"rule:{cv.gate.rule}".encode())
        for g in cv.gate.gates:
            h.update(f"g{g.layer}{g.comparison}{g.threshold!r}:".encode())
            h.update(np.ascontiguousarray(g.direction, dtype=np.float32).tobytes())
    return h.hexdigest()


def queries_sha256(kinds: Mapping[str, Sequence[str]]) -> str:
    """Return the SHA-256 of the query lists, in order (the states and labels are stored by position)."""
    text = json.dumps({k: list(v) for k, v in sorted(kinds.items())}, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RequestWork:
    """The saved work of one request-recipe run in ``OUT/request-work``: read back what is there,
    save each finished part, and say what is kept (for the Ctrl-C line and report.json)."""

    def __init__(self, out: Path, kinds: Mapping[str, Sequence[str]], layers: Sequence[int], n_embd: int) -> None:
        self.folder = out / WORK_FOLDER
        self.kinds = {k: list(v) for k, v in kinds.items()}
        self.shape = (len(layers), n_embd)
        self.n_states = {k: 0 for k in self.kinds}  # saved now (this run's chunks too)
        self.found_states = dict(self.n_states)  # saved by an earlier run (what this one reused)
        self.n_labels = 0
        self.unsteered_kept = False
        self.n_trials = 0
        self.key = ""  # the vector_key of the vector being calibrated (load_calibration)
        self.reused: dict[str, dict[str, int]] = {}  # stage -> {"reused": n, "of": total}, filled as stages load
        self._bulk: tuple[list[Path], int] = ([], 0)  # what a finished run removes, and its bytes (plan_removal)

    @classmethod
    def open(cls, out: Path, model_sha256: str, seed: int, kinds: Mapping[str, Sequence[str]],
             layers: Sequence[int], n_embd: int) -> "RequestWork":
        """Return the work in ``out`` after checking it belongs to this run (AlignezError, before
        anything is written, when it does not); a folder with none gets its manifest now."""
        work = cls(out, kinds, layers, n_embd)
        manifest = {"format": FORMAT, "model_sha256": model_sha256, "seed": seed,
                    "queries_sha256": queries_sha256(kinds), "queries": {k: len(v) for k, v in work.kinds.items()},
                    "layers": [int(x) for x in layers], "n_embd": n_embd}
        path = work.folder / "manifest.json"
        if path.exists():
            work._check(path, manifest)
        else:
            work.folder.mkdir(parents=True, exist_ok=True)
            write_json(path, manifest)
        work._states_folder.mkdir(exist_ok=True)  # after the check: another run's folder is left untouched
        return work

    def _check(self, path: Path, want: dict[str, Any]) -> None:
        """Raise one line naming what differs when the saved manifest is not ``want``."""
        fix = f"use another output folder, or delete {self.folder} to start over"
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise AlignezError(f"{path} cannot be read as the manifest of a request run's saved work; {fix}") from None
        if not isinstance(have, dict) or have.get("format") != FORMAT:
            raise AlignezError(f"{path} is not the manifest of this version's request-run work ({FORMAT}); {fix}")
        differ = []
        if have.get("model_sha256") != want["model_sha256"]:
            differ.append(f"another model (SHA-256 {str(have.get('model_sha256'))[:12]}..., this one {want['model_sha256'][:12]}...)")
        elif (have.get("layers"), have.get("n_embd")) != (want["layers"], want["n_embd"]):
            differ.append(f"other layers ({have.get('layers')}, this run {want['layers']})")  # another version's choice
        if have.get("seed") != want["seed"]:
            differ.append(f"another seed ({have.get('seed')}, this run {want['seed']})")
        if have.get("queries_sha256") != want["queries_sha256"]:
            differ.append(f"another query set ({have.get('queries')} requests, this run {want['queries']})")
        if differ:
            raise AlignezError(f"{self.folder} holds the saved work of a run with {' and '.join(differ)}; {fix}")

    # --- stage 1: the states read alone ------------------------------------------------------------

    @property
    def _states_folder(self) -> Path:
        return self.folder / "states"

    def _chunk_path(self, kind: str, start: int) -> Path:
        return self._states_folder / f"{kind}-{start:05d}.npy"

    def states(self, kind: str) -> np.ndarray:
        """Return the saved states of ``kind``'s first requests (n x layers x n_embd, float32), the
        complete chunks from the start."""
        total = len(self.kinds[kind])
        rows: list[np.ndarray] = []
        start = 0
        while start < total and (path := self._chunk_path(kind, start)).exists():
            want = (min(STATE_CHUNK, total - start), *self.shape)
            try:
                part = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                part = None
            if part is None or part.shape != want or part.dtype != np.float32:
                raise AlignezError(f"{path} is damaged (not {want[0]} saved states); delete it and run again to read them again")
            rows.append(part)
            start += len(part)
        self.n_states[kind] = self.found_states[kind] = start
        self._note("capture", sum(self.found_states.values()), sum(len(v) for v in self.kinds.values()))
        return np.concatenate(rows) if rows else np.zeros((0, *self.shape), dtype=np.float32)

    def save_states(self, kind: str, start: int, rows: np.ndarray) -> None:
        """Save one chunk of ``kind``'s states, whole or not at all."""
        with atomic_write(self._chunk_path(kind, start), "wb") as fh:
            np.save(fh, np.asarray(rows, dtype=np.float32), allow_pickle=False)
        self.n_states[kind] = start + len(rows)

    # --- stage 2: the refusal labels ---------------------------------------------------------------

    @property
    def _labels_path(self) -> Path:
        return self.folder / "refusals.jsonl"

    def labels(self) -> tuple[list[bool], int | None]:
        """Return the saved refusal labels of the first risky requests and the chunk step they were
        answered in (None when none are saved)."""
        refused: list[bool] = []
        step = None
        if self._labels_path.exists():
            for rec in read_jsonl(self._labels_path):
                if rec.get("start") != len(refused) or not isinstance(rec.get("refused"), list) or not isinstance(rec.get("step"), int):
                    raise AlignezError(f"{self._labels_path} is out of order; delete it and run again to answer again")
                refused += [bool(x) for x in rec["refused"]]
                step = int(rec["step"])
        self.n_labels = len(refused)
        self._note("answers", self.n_labels, len(self.kinds["risky"]))
        return refused, step

    def save_labels(self, start: int, step: int, refused: Sequence[bool]) -> None:
        """Append one chunk's refusal labels (fsynced)."""
        with JsonlAppender(self._labels_path) as log:
            log.append({"start": start, "step": step, "refused": [bool(x) for x in refused]})
        self.n_labels = start + len(refused)

    # --- stage 4: the calibration (strength_by_refusals.RefusalMemo) -------------------------------

    @property
    def _calibration_path(self) -> Path:
        return self.folder / "calibration.jsonl"

    def _calibration(self) -> list[dict[str, Any]]:
        """Return the saved calibration lines of the vector being calibrated (``load_calibration``'s)."""
        recs = read_jsonl(self._calibration_path) if self._calibration_path.exists() else []
        return [r for r in recs if r.get("vector") == self.key]

    def load_calibration(self, cv: ControlVector) -> None:
        """Take the saved calibration work of ``cv`` (lines of any other vector are passed over)
        and count it for the report and the Ctrl-C line."""
        self.key = vector_key(cv)
        recs = self._calibration()
        self.unsteered_kept = any("unsteered" in r for r in recs)
        self.n_trials = sum("trial" in r for r in recs)
        if recs:
            # No total: the search stops at the first strength that fails, so how many it tries is unknown.
            self.reused["calibrate"] = {"unsteered_answers": self.unsteered_kept, "trials": self.n_trials}

    def unsteered(self) -> tuple[list[str], list[int]] | None:
        """Return the saved unsteered answers and opened prompts, None when there are none."""
        rec = next((r for r in self._calibration() if "unsteered" in r), None)
        return None if rec is None else ([str(t) for t in rec["unsteered"]], [int(i) for i in rec["opened"]])

    def save_unsteered(self, answers: Sequence[str], opened: Sequence[int]) -> None:
        with JsonlAppender(self._calibration_path) as log:
            log.append({"vector": self.key, "unsteered": list(answers), "opened": [int(i) for i in opened]})
        self.unsteered_kept = True

    def trial(self, strength: float) -> RefusalTrial | None:
        """Return the saved trial of ``strength`` (its fields as they were), None when there is none."""
        for rec in self._calibration():
            if "trial" in rec and rec["trial"]["strength"] == strength:
                return RefusalTrial(**rec["trial"])
        return None

    def save_trial(self, trial: RefusalTrial) -> None:
        with JsonlAppender(self._calibration_path) as log:
            log.append({"vector": self.key, "trial": asdict(trial)})  # JSON floats round-trip exactly (repr)
        self.n_trials += 1

    # --- what is kept ------------------------------------------------------------------------------

    def plan_removal(self, keep: bool) -> dict[str, Any]:
        """Return report.json's "saved_work" of a finished run: what stays in the folder and what
        ``remove_planned`` removes: the states (most of the work's bytes; every file in states/, a
        temporary one left by a crash too), unless ``keep``. The manifest, labels and calibration
        stay (kilobytes: with them a re-run with the same settings redoes only the reading of the states)."""
        chunks = sorted(p for p in self._states_folder.iterdir() if p.is_file())
        bulk = [] if keep else chunks
        self._bulk = (bulk, sum(p.stat().st_size for p in bulk))
        kept = sorted(p.name for p in self.folder.iterdir() if p.is_file()) + (["states/"] if keep and chunks else [])
        return {"folder": self.folder.name, "kept": kept,
                "removed": {"states/": {"files": len(bulk), "bytes": self._bulk[1]}} if bulk else {}}

    def remove_planned(self) -> str | None:
        """Remove what ``plan_removal`` named (call it once the vector and report are written);
        return the status line saying so, None when there was nothing to remove."""
        (files, size), self._bulk = self._bulk, ([], 0)
        if not files:
            return None
        try:
            for path in files:
                path.unlink(missing_ok=True)
        except OSError as err:
            return f"warning: could not remove the saved states in {self._states_folder} ({err.strerror}); delete them by hand"
        self.n_states = {k: 0 for k in self.kinds}
        return (f"{self.folder}: removed the saved states ({len(files)} files, {size / 1e6:.1f} MB) now that the vector is written; "
                "the manifest, refusal labels and calibration stay (--keep-work keeps everything)")

    def _note(self, stage: str, reused: int, total: int) -> None:
        if reused:
            self.reused[stage] = {"reused": reused, "of": total}

    def kept(self) -> str:
        """Return what is saved, for the Ctrl-C line: "412 of 1201 states ... kept in FOLDER"."""
        n, total = sum(self.n_states.values()), sum(len(v) for v in self.kinds.values())
        parts = [f"{n} of {total} states"]
        if n == total:
            parts.append(f"{self.n_labels} of {len(self.kinds['risky'])} refusal labels")
        if self.unsteered_kept:
            parts.append(f"the unsteered answers and {self.n_trials} strength trial{'s' * (self.n_trials != 1)}")
        return f"{', '.join(parts)} kept in {self.folder}"

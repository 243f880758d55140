"""Crash-safe file writing: whole files atomically, record logs append-and-flush."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from alignez_local.errors import AlignezError


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path after checking its folder exists and can be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise AlignezError(f"cannot write {p}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise AlignezError(f"cannot write {p}: folder {parent} is not writable; choose another path")
    if p.is_dir():
        raise AlignezError(f"cannot write {p}: it is a folder; give a file name")
    return p


def make_temp_beside(p: Path) -> tuple[int, str]:
    """Return (fd, name) of a new temporary file in ``p``'s folder, with the permissions a plain
    ``open`` would give (mkstemp's 0600 would make shared vectors unreadable to others)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    An interrupted write leaves either the old file or the new one, never a half-written file.
    """
    p = check_writable(path)
    fd, tmp = make_temp_beside(p)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text``, atomically."""
    with atomic_write(path) as fh:
        fh.write(text)


class JsonlAppender:
    """Append JSON records one per line, flushed and fsynced per record, so a kill loses at most
    the record being written, and that partial line is detected and dropped by ``read_jsonl``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = check_writable(path)
        repair_jsonl_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair_jsonl_tail(path: Path) -> None:
    """Cut a trailing partial line (from a killed writer) so appends start on a clean line."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        fh.truncate(cut)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read complete JSON-object lines; an unterminated last line (a killed writer) is ignored."""
    p = Path(path)
    records: list[dict[str, Any]] = []
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise AlignezError(f"cannot read {p}: {err.strerror}") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] != b"":
        lines = lines[:-1]  # partial record from an interrupted append
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AlignezError(f"{p} line {n} is not valid JSON; fix or remove that line") from None
        if not isinstance(obj, dict):
            raise AlignezError(f"{p} line {n} is not a JSON object; each line must be one record")
        records.append(obj)
    return records


def plain(value: Any) -> Any:
    """Return ``value`` with the read-only mappings and tuples of a loaded file as dicts and lists (for JSON)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value

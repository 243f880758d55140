"""A judge's finished judgments on disk, so that an error or Ctrl-C loses none and ``--resume``
asks the judge nothing twice."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignez_local.fileio import JsonlAppender, read_jsonl


class JudgeCache:
    """Finished judgments on disk (JSONL, one ``{"key", "margin"}`` per line, flushed as each arrives).

    The key is a SHA-256 of the judge's ``cache_id`` (its model), the verdict words and the request's
    messages, so a judgment is reused only for the same model and the same prompt text. A partial last
    line (a kill mid-write) is dropped on reading.
    """

    def __init__(self, path: str | Path, fresh: bool = False) -> None:
        """Return the cache at ``path``, emptied first when ``fresh``."""
        self.path = Path(path)
        if fresh and self.path.exists():
            self.path.unlink()
        self.values: dict[str, float] = {}
        if self.path.exists():
            for rec in read_jsonl(self.path):
                if isinstance(rec.get("key"), str) and isinstance(rec.get("margin"), (int, float)):
                    self.values[rec["key"]] = float(rec["margin"])
        self.loaded = len(self.values)
        self._out: JsonlAppender | None = None

    @staticmethod
    def key(model: str, words: tuple[str, str], messages: tuple[str, str, str]) -> str:
        """Return the cache key of one judgment (``messages``: the request's system prompt, user
        message and reply prefix)."""
        blob = json.dumps([model, list(words), *messages], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> float | None:
        """Return the cached margin of ``key``, None when not cached."""
        return self.values.get(key)

    def put(self, key: str, margin: float) -> None:
        """Return None after storing one finished margin (on disk at once)."""
        if self._out is None:
            self._out = JsonlAppender(self.path)
        self._out.append({"key": key, "margin": margin})
        self.values[key] = margin

    def close(self) -> None:
        """Return None after closing the file."""
        if self._out is not None:
            self._out.close()
            self._out = None

"""The one owner of Ctrl-C (SIGINT) and SIGTERM: how a stop reaches a running decode, and how the
long commands (steer, generate, fit, eval) stop on SIGTERM as they do on Ctrl-C.

Python runs a signal handler on the main thread between bytecodes, which can be inside a ctypes
callback that llama.cpp is calling (the eval callback during a decode, the log sink while a model
loads). An exception raised there is printed by ctypes and dropped, and the decode goes on. So:

- ``decode_guard`` (the scheduler, around a run on the main thread): Ctrl-C only sets the hook
  state's flags; llama.cpp's abort callback then ends the decode cleanly, and KeyboardInterrupt is
  raised after it, from plain Python (by the scheduler, or by the guard when the stop came after
  the last decode step).
- ``sigterm_as_ctrl_c`` (the CLI, around a long command; ``run_eval`` too): SIGTERM does what Ctrl-C
  does. Inside a decode it goes to the guard; inside another C callback it is only noted, and the
  next guard (or the caller's own check of ``seen``) stops the work; elsewhere it raises
  KeyboardInterrupt at once. A run started in the background, where Ctrl-C is ignored, still
  stops cleanly and saves what it did.

Only the main thread may set handlers (``signal.signal`` raises elsewhere): on another thread
(the server's engine thread) both are no-ops, and the server owns its signals (uvicorn).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

# Exit codes as a shell reports a process killed by the signal: 128 + its number.
EXIT_CTRL_C = 130
EXIT_SIGTERM = 143

# Python functions that llama.cpp calls from C: an exception raised in one is printed and dropped.
_C_CALLBACKS = frozenset({"_log_sink", "eval_callback", "abort_callback"})


class AbortFlags(Protocol):
    """What the eval and abort callbacks read (``hooks.HookState``)."""

    interrupted: bool
    abort: bool


class Stopped(KeyboardInterrupt):
    """A stop (Ctrl-C or SIGTERM) that says in one line what was kept and what to run next; the
    CLI prints ``line`` as it is (``cli.AlignezGroup``)."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


@dataclass
class SigtermSeen:
    """Whether SIGTERM arrived inside a ``sigterm_as_ctrl_c`` block (the stop it causes is a plain
    KeyboardInterrupt, so this is how the caller tells it from Ctrl-C)."""

    seen: bool = False

    @property
    def exit_code(self) -> int:
        """Return the shell's exit code for the stop: 143 after SIGTERM, 130 after Ctrl-C."""
        return EXIT_SIGTERM if self.seen else EXIT_CTRL_C

    def word(self) -> str:
        """Return how the stop is named in its line: "interrupted" or "terminated (SIGTERM)"."""
        return "terminated (SIGTERM)" if self.seen else "interrupted"


class _State:
    guard: AbortFlags | None = None  # the flags of the decode running on the main thread, if any
    pending: bool = False  # a SIGTERM noted inside a C callback, not acted on yet


def in_c_callback(frame: FrameType | None) -> bool:
    """Return True when ``frame`` (a signal handler's) runs inside one of our ctypes callbacks."""
    while frame is not None:
        if frame.f_code.co_name in _C_CALLBACKS and str(frame.f_globals.get("__name__", "")).startswith(
                "alignez_local.llama."):
            return True
        frame = frame.f_back
    return False


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def decode_guard(flags: AbortFlags) -> Iterator[None]:
    """Return a context in which Ctrl-C (and SIGTERM under ``sigterm_as_ctrl_c``) aborts the decode
    cleanly through ``flags``; KeyboardInterrupt follows once the decode has returned.

    A SIGTERM noted before the block (inside a C callback) stops it at once. The previous SIGINT
    handler is put back after (a background job's ignored SIGINT stays ignored).
    """
    if not _on_main_thread():
        yield
        return
    if _State.pending:
        _State.pending = False
        raise KeyboardInterrupt

    def on_sigint(_signum: int, _frame: FrameType | None) -> None:
        flags.interrupted = True
        flags.abort = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    outer, _State.guard = _State.guard, flags
    try:
        yield
    finally:
        _State.guard = outer
        signal.signal(signal.SIGINT, previous)
    if flags.interrupted:  # the stop came after the last decode step checked for it: honour it now
        raise KeyboardInterrupt


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[SigtermSeen]:
    """Return a context in which SIGTERM stops the work as Ctrl-C does (see the module docstring);
    the previous SIGTERM handler is put back after. ``seen`` tells a SIGTERM stop from Ctrl-C."""
    seen = SigtermSeen()
    if not _on_main_thread():
        yield seen
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        seen.seen = True
        guard = _State.guard
        if guard is not None:
            guard.interrupted = True  # only flags: safe anywhere, inside a callback too
            guard.abort = True
        elif in_c_callback(frame):
            _State.pending = True
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield seen
    finally:
        # None: a handler not set from Python, which cannot be put back; the default is the nearest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        _State.pending = False

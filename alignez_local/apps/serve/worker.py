"""The one thread that owns the Engine, and the jobs the HTTP side hands it.

An Engine is single-threaded, so every llama.cpp call after start-up happens on this thread. The
HTTP side (asyncio) puts a ``Job`` on a queue and reads the job's events from its own
``asyncio.Queue``; the worker pushes events with ``loop.call_soon_threadsafe``.

Batching: the worker takes every waiting job (up to ``--parallel``, and only as many as fit the
context together: the KV cache is unified, so the prompts plus their max_tokens must fit n_ctx)
and runs them as the sequences of one ``Engine.generate`` call, each with its own sampler and its
own steering (``SteeringSet.batch_edits``). Jobs that arrive during a batch join the next one.

A job whose client went away is marked cancelled: if it has not started it is dropped; if it is
running its text is discarded, and once every job of the batch is cancelled (or the server is
stopping) the batch is abandoned at the next token. (The engine has no way yet to stop just one
sequence of a batch, or to admit new ones into a running batch.)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

from alignez_local.apps.serve.steering import Choice, SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Completion, Engine, Sampling

log = logging.getLogger("alignez.serve")


class _Abandoned(Exception):
    """Every client of the running batch has gone, or the server is stopping."""


@dataclass(frozen=True)
class Event:
    """What a job reports: "text" (a piece), "done" (with the completion) or "error" (a message)."""

    kind: str
    text: str = ""
    completion: Completion | None = None


@dataclass
class Job:
    """One request: a prompt, its sampling and steering, and where its events go."""

    prompt: str
    n_prompt: int
    sampling: Sampling
    steering: Choice
    emit: Callable[[Event], None]
    cancelled: bool = False
    started: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def budget(self) -> int:
        """Return the KV cells this job can use at most."""
        return self.n_prompt + self.sampling.max_tokens

    def cancel(self) -> None:
        """Stop caring about this job's output (the client went away)."""
        self.cancelled = True

    def send(self, ev: Event) -> None:
        if not self.cancelled:
            self.emit(ev)
        if ev.kind != "text":
            self.finished.set()


def asyncio_sink(loop: asyncio.AbstractEventLoop, q: "asyncio.Queue[Event]") -> Callable[[Event], None]:
    """Return an emit function that delivers events from the worker thread into ``q`` on ``loop``."""

    def emit(ev: Event) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, ev)
        except RuntimeError:
            pass  # the loop is closed: the server is stopping and nobody is listening

    return emit


class Worker:
    """Owns the Engine; runs waiting jobs together in batches until stopped."""

    def __init__(
        self, engine: Engine, steering: SteeringSet, parallel: int | None = None, batch_wait: float = 0.0
    ) -> None:
        self.engine = engine
        self.steering = steering
        # Seconds to wait after a batch's first job for others to join it (0: start at once).
        self.batch_wait = batch_wait
        self.parallel = min(parallel or engine.n_parallel, engine.n_parallel)
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._held: list[Job] = []  # taken from the queue but not yet run (did not fit the last batch)
        self._lock = threading.Lock()
        self.running: list[Job] = []
        self.waiting = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="alignez-engine", daemon=True)

    # --- HTTP side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; it runs in the next batch with room."""
        if self._stopping:
            raise AlignezError("the server is shutting down")
        with self._lock:
            self.waiting += 1
        self._queue.put(job)

    def stats(self) -> dict[str, int]:
        """Return slot use for /health: total, processing, and requests waiting."""
        with self._lock:
            busy = sum(1 for j in self.running if not j.finished.is_set())
            return {"slots_total": self.parallel, "slots_processing": busy, "requests_waiting": self.waiting}

    @property
    def alive(self) -> bool:
        """True while the engine thread runs (the engine must not be closed then)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking jobs, fail the waiting ones, and return True once the engine thread ended."""
        self._stopping = True
        for j in list(self.running):
            j.cancel()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                break
            with self._lock:
                self.running = batch
                self.waiting -= len(batch)
            try:
                self._run(batch)
            finally:
                with self._lock:
                    self.running = []
        for j in self._drain():
            j.send(Event("error", "the server is shutting down"))

    def _take(self) -> list[Job] | None:
        """Return the next batch (blocking for its first job), or None when stopping."""
        pending = self._held
        self._held = []
        if not pending:
            first = self._queue.get()
            if first is None or self._stopping:
                if first is not None:
                    pending.append(first)
                self._held = pending
                return None
            pending.append(first)
        deadline = time.monotonic() + self.batch_wait
        while True:
            try:
                left = deadline - time.monotonic()
                full = len(pending) >= self.parallel
                j = self._queue.get(timeout=left) if left > 0 and not full else self._queue.get_nowait()
            except queue.Empty:
                break
            if j is None:
                self._stopping = True
                break
            pending.append(j)
        batch: list[Job] = []
        used = 0
        for j in pending:
            if j.cancelled:
                with self._lock:
                    self.waiting -= 1
                j.finished.set()
            elif len(batch) < self.parallel and used + j.budget <= self.engine.n_ctx:
                batch.append(j)
                used += j.budget
            else:
                self._held.append(j)
        if self._stopping and not batch:
            return None
        return batch

    def _drain(self) -> list[Job]:
        out = self._held
        self._held = []
        while True:
            try:
                j = self._queue.get_nowait()
            except queue.Empty:
                return out
            if j is not None:
                out.append(j)

    def _run(self, batch: Sequence[Job]) -> None:
        """Run ``batch`` as one generate call with per-job steering; every job gets done or error."""
        prompts = [j.prompt for j in batch]
        for j in batch:
            j.started = True

        def on_token(i: int, text: str) -> None:
            # Raised here, outside llama.cpp's callbacks, so generate unwinds cleanly and frees the
            # KV cache: nobody wants this batch's tokens any more.
            if self._stopping or all(j.cancelled for j in batch):
                raise _Abandoned
            batch[i].send(Event("text", text))

        try:
            edits = self.steering.batch_edits(self.engine, prompts, [j.steering for j in batch])
            with ExitStack() as stack:
                for e in edits:
                    stack.enter_context(self.engine.activation_edit(e.fn, e.layers, e.site, e.all_tokens))
                done = self.engine.generate(prompts, [j.sampling for j in batch], on_token=on_token)
        except _Abandoned:
            for j in batch:
                j.send(Event("error", "the server is shutting down"))
            return
        except AlignezError as err:
            for j in batch:
                j.send(Event("error", str(err)))
            return
        except Exception as err:  # noqa: BLE001 - one bad batch must not end the server
            log.error("batch failed: %s", "".join(traceback.format_exception(err)))
            for j in batch:
                j.send(Event("error", f"internal error: {type(err).__name__}: {err}"))
            return
        for j, c in zip(batch, done):
            j.send(Event("done", completion=c))


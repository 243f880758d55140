"""The one thread that owns the Engine, and the jobs the HTTP side hands it.

An Engine is single-threaded, so every llama.cpp call after start-up happens on this thread. The
HTTP side (asyncio) puts a ``Job`` on a queue and reads the job's events from its own
``asyncio.Queue``; the worker pushes events with ``loop.call_soon_threadsafe``.

Continuous admission: the worker runs one ``Engine.generate_live`` while there is work. Between
decode steps the engine asks the worker (``_admit``) for sequences to start; a job that arrived
meanwhile joins the running decode at once when a slot is free and its KV budget fits: the KV
cache is unified, so the prompts plus max_tokens of the running jobs must fit n_ctx together.
Each job is steered by its own choice through ``LiveSteering``. A job that chose a profile or a
gated vector is decoded twice, as the single-user path does: a prefill-only planning sequence (the
unsteered activation the exact edit's plan and the gate need), then the generating sequence. With
``plan_every_job`` (``serve --deterministic``) every job takes this path while a profile or gated
vector is loaded, steered or not, so the batch shapes a request sees never depend on its
neighbours' choices.

A job whose client went away is cancelled: waiting, it is dropped; running, its sequence leaves
the decode before the next step (KV cells removed, slot free) while the others keep decoding.
When the server stops, the running decode is abandoned before its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from alignez_local.apps.serve.steering import Choice, LiveSteering, SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import CANCELLED, Completion, Engine, Sampling, Seq, TokenLogprob

log = logging.getLogger("alignez.serve")


class _Abandoned(Exception):
    """The server is stopping: the running decode ends before its next step."""


@dataclass(frozen=True)
class Event:
    """What a job reports: "text" (a piece), "done" (with the completion) or "error" (a message).

    ``logprobs`` (jobs that asked for them): the tokens whose text starts in this piece ("text"),
    or the ones not sent with a piece yet ("done"); a stream carries each shown token once.
    """

    kind: str
    text: str = ""
    completion: Completion | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Job:
    """One request: a prompt, its sampling and steering, and where its events go."""

    tokens: list[int]  # the prompt, tokenized by the HTTP side (chat content as text, not markup)
    sampling: Sampling
    steering: Choice
    emit: Callable[[Event], None]
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and k alternatives
    cancelled: bool = False
    started: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def budget(self) -> int:
        """Return the KV cells this job can use at most."""
        return len(self.tokens) + self.sampling.max_tokens

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


@dataclass
class _Live:
    """A job inside the running decode: its current sequence (planning, then generating)."""

    job: Job
    seq: Seq
    planning: bool
    chars: int = 0  # characters of text sent so far
    sent: int = 0  # tokens whose logprobs were sent so far


class Worker:
    """Owns the Engine; runs jobs as sequences of one continuing decode until stopped."""

    def __init__(
        self, engine: Engine, steering: SteeringSet, parallel: int | None = None, batch_wait: float = 0.0,
        reuse_prompts: bool = False, plan_every_job: bool = False,
    ) -> None:
        self.engine = engine
        self.steering = steering
        # Seconds an idle worker waits after a first job for others to start with it (0: at once).
        self.batch_wait = batch_wait
        # Prompt reuse (``serve --cache-prompt``): a job may start from the prompt cells an earlier
        # job steered alike left in its slot; the run then lasts while the server does, so the
        # cells outlive an idle moment.
        self.reuse_prompts = reuse_prompts
        # Plan jobs that do not use the plan too, so batch shapes never depend on the neighbours'
        # choices (--deterministic; else a planning prefill costs only the jobs that need it).
        self.plan_every_job = plan_every_job
        self.parallel = min(parallel or engine.n_parallel, engine.n_parallel)
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._held: list[Job] = []  # taken from the queue but not started (no slot or no room yet)
        self._lock = threading.Lock()
        self.running: list[Job] = []
        self.waiting = 0
        self._stopping = False
        self._live: dict[int, _Live] = {}  # sequence key -> its job
        self._ready: list[Seq] = []  # generating sequences of planned jobs, to hand in next step
        self._keys = itertools.count()
        self._steer = LiveSteering(steering)
        self._thread = threading.Thread(target=self._loop, name="alignez-engine", daemon=True)

    # --- HTTP side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the running decode as soon as a slot is free."""
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
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- engine thread: between runs ---------------------------------------------------------

    def _loop(self) -> None:
        while self._wait_for_work():
            self._run()
        for j in self._drain():
            j.send(Event("error", "the server is shutting down"))

    def _wait_for_work(self) -> bool:
        """Block until a job is held (then wait ``batch_wait`` for company); False when stopping."""
        while not self._held:
            if self._stopping or not self._pull(block=True):
                return False
        deadline = time.monotonic() + self.batch_wait
        while len(self._held) < self.parallel and (left := deadline - time.monotonic()) > 0:
            if not self._pull(block=True, timeout=left):
                return False
        return not self._stopping

    def _pull(self, block: bool = False, timeout: float | None = None) -> bool:
        """Move queued jobs to ``_held`` (one when blocking, else all); False once told to stop."""
        try:
            j = self._queue.get(timeout=timeout) if block else self._queue.get_nowait()
        except queue.Empty:
            return not self._stopping
        while True:
            if j is None:
                self._stopping = True
            elif j.cancelled:
                self._forget_waiting(j)
            else:
                self._held.append(j)
            if block:
                return not self._stopping
            try:
                j = self._queue.get_nowait()
            except queue.Empty:
                return not self._stopping

    def _forget_waiting(self, j: Job) -> None:
        with self._lock:
            self.waiting -= 1
        j.finished.set()

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

    # --- engine thread: one run --------------------------------------------------------------

    def _run(self) -> None:
        """Run one continuing decode until no job is left; every job started gets done or error."""
        try:
            with ExitStack() as stack:
                self._steer.enter(self.engine, stack)
                self.engine.generate_live(self._admit, on_token=self._on_token, on_done=self._on_done,
                                          reuse_prompts=self.reuse_prompts)
        except _Abandoned:
            self._fail_running("the server is shutting down")
        except AlignezError as err:
            self._fail_running(str(err))
        except Exception as err:  # noqa: BLE001 - one bad run must not end the server
            log.error("decode failed: %s", "".join(traceback.format_exception(err)))
            self._fail_running(f"internal error: {type(err).__name__}: {err}")
        finally:
            for key in list(self._live):
                self._steer.forget(key)
            self._live.clear()
            self._ready.clear()
            with self._lock:
                self.running = []

    def _fail_running(self, message: str) -> None:
        for live in list(self._live.values()):
            live.job.send(Event("error", message))

    def _admit(self) -> list[Seq]:
        """Between decode steps: cancel the sequences of gone clients, hand in new sequences."""
        # Raised here, between steps and outside llama.cpp's callbacks, so the run unwinds cleanly.
        if self._stopping:
            raise _Abandoned
        self._pull()
        while self.reuse_prompts and not (self._held or self._live or self._ready or self._stopping):
            self._pull(block=True)  # idle: wait inside the run, so the kept prompt cells stay
        if self._stopping:
            raise _Abandoned
        for live in self._live.values():
            if live.job.cancelled:
                live.seq.cancel()  # its KV cells and slot are freed before this step's decode
        for j in [j for j in self._held if j.cancelled]:
            self._held.remove(j)
            self._forget_waiting(j)
        new, self._ready = self._ready, []
        # In arrival order: a big job waits for room rather than being overtaken forever.
        while self._held and self._fits(self._held[0]):
            seq = self._start(self._held.pop(0))
            if seq is not None:
                new.append(seq)
        if self.reuse_prompts and (sum(live.job.budget for live in self._live.values()) + self.engine.kept_prompt_cells()
                                   > self.engine.n_ctx):
            self.engine.drop_kept_prompts()  # kept cells never take the room a running job may need
        # Every sequence of the coming step (cancelled ones leave before it).
        self._steer.place(self.engine, [k for k, live in self._live.items() if live.seq.finish is None])
        return new

    def _fits(self, job: Job) -> bool:
        """True when ``job`` gets a slot and its KV budget fits beside the running jobs'."""
        running = [live.job for live in self._live.values()]
        return len(running) < self.parallel and sum(j.budget for j in running) + job.budget <= self.engine.n_ctx

    def _start(self, job: Job) -> Seq | None:
        """Return the first sequence of ``job``: its planning prefill, or its generation."""
        job.started = True
        with self._lock:
            self.waiting -= 1
        tokens = job.tokens
        if self._steer.needs_planning and (self.plan_every_job or self._steer.uses_plan(job.steering)):
            seq = Seq(next(self._keys), tokens, cache_tag=() if self.reuse_prompts else None)  # unsteered cells
            self._steer.plan(seq.key)
            self._live[seq.key] = _Live(job, seq, planning=True)
            self._sync_running()
            return seq
        return self._generating(job, tokens, None)

    def _generating(self, job: Job, tokens: list[int], planned_by: int | None) -> Seq | None:
        """Return ``job``'s generating sequence, steered by its choice (None: the job failed)."""
        seq = Seq(next(self._keys), tokens, sampling=job.sampling, n_top=job.top_logprobs)
        try:
            job.sampling.check()
            self._steer.start(seq.key, job.steering, planned_by)
            if self.reuse_prompts:
                seq.cache_tag = self._steer.cells_tag(seq.key)
        except AlignezError as err:  # this job's problem only: the others keep decoding
            self._steer.forget(seq.key)
            job.send(Event("error", str(err)))
            self._sync_running()
            return None
        self._live[seq.key] = _Live(job, seq, planning=False)
        self._sync_running()
        return seq

    def _sync_running(self) -> None:
        with self._lock:
            self.running = [live.job for live in self._live.values()]

    def _on_token(self, key: int, text: str) -> None:
        live = self._live.get(key)
        if live is None:
            return
        lps = None
        live.chars += len(text)
        if live.seq.n_top is not None:
            tops, start = live.seq.top_tokens, live.sent
            while live.sent < len(tops) and tops[live.sent].offset < live.chars:
                live.sent += 1
            lps = tops[start : live.sent]
        live.job.send(Event("text", text, logprobs=lps))

    def _on_done(self, seq: Seq) -> None:
        """A sequence left the decode: plan and queue a job's generation, or finish the job."""
        live = self._live.pop(seq.key)
        job = live.job
        if live.planning and seq.finish is None and not job.cancelled:
            gen = self._generating(job, seq.tokens, seq.key)
            if gen is not None:
                self._ready.append(gen)  # takes the slot the planning sequence just left
            return
        self._steer.forget(seq.key)
        if seq.finish == CANCELLED or job.cancelled:
            job.finished.set()
        else:
            rest = seq.top_tokens[live.sent :] if seq.n_top is not None else None
            job.send(Event("done", completion=self.engine.completion(seq), logprobs=rest))
        self._sync_running()

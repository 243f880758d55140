"""The vectors and profiles a server has loaded, and per-request steering inside one decode batch.

Every request in a batch is one sequence of ``Engine.generate``; the engine's edit callback sees
which sequence (``key`` = the request's index in the batch) each row belongs to. So:

- a control vector becomes an ``all_tokens`` edit on ``l_out`` that adds strength x direction to
  the rows of the requests that asked for it (what llama.cpp's control vector does, per sequence);
- a profile becomes the exact AlignEZ edit on its site with a plan per request, made from an
  unsteered capture of that request's prompt, as ``Steering.applied`` does for one user;
- a gated vector is that vector edit for the requests whose gates (one, or several with their
  any/all rule) opened on the same unsteered capture, and no edit for the others.

The arithmetic is ``align/steering.py``'s (``Steering.vector_sum``, ``Steering.plans``,
``profile_edit``), reused, so a request steered alone gets the tokens ``alignez chat`` gives.
Rows of requests that chose nothing are written back unchanged.

``batch_edits`` steers a fixed batch (one ``Engine.generate``); ``LiveSteering`` steers a running
decode that requests join and leave (``Engine.generate_live``, what the server's worker runs).

A gate that stays shut (issue 20): the request gets bit for bit what it gets asking for no steering
(``{}``, ``0``, or the vector at 0) beside the same neighbours, decoded the same way. Its rows are
never written (no entry in the per-key tables), and the eval callback that the loaded vector adds
to every decode changes no value by splitting the graph (measured: a no-op edit of every ``l_out``
row leaves the logits bit-identical on the tiny model and on Qwen2.5-Coder-0.5B). With
``serve --deterministic`` every job is planned whether it chose the gated vector or not, so the
choice does not change the batch shapes; by default only the jobs that chose it are, and the bits
depend on the neighbours anyway (flash attention, prompt reuse).
What the server cannot give is ``Steering.generate``'s stronger promise, a shut prompt decoded
beside unsteered prompts only (or, with ``reference=True``, equality with a batch in which NOBODY's
gate opened): a request whose gate opens answers differently, ends at another step, and from then
on its neighbours decode in other batch shapes, which moves their logits in the last bits
(llama.cpp's CPU kernels sum in a shape-dependent order). ``Steering.generate`` avoids that by
decoding the shut and the opened prompts as separate runs; a live server decodes every request in
the one running batch (its batches depend on when requests arrive).
The same holds for the gate's own reading: a job's planning prefill is decoded beside the
running jobs, so its state at the gate can differ from the prompt read alone (what ``Steering``
decides by; ``align/steering.BATCH_MARGIN`` says by how much); a prompt within that distance of a
threshold may open in one and not the other. ``batch_edits`` decides gates as each prompt read alone decides (``read_gates``), as
``Steering`` does.
"""

# size: the one owner of per-request steering in the server: the loaded set, a fixed batch's edits and
# a live decode's tables share the same arithmetic and the same exactness promise, read together.
from __future__ import annotations

import math
import reprlib
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.align.edit import EditPlan, edit_delta, plan_edit
from alignez_local.align.steering import (
    DEFAULT_TOP_N, AnswerEdit, AnswerSums, ProfileSlot, Steering, VectorSlot, profile_edit, vector_edit,
)
from alignez_local.errors import AlignezError
from alignez_local.formats.gate import GATE_SITE, Gates
from alignez_local.formats.control_vector import ADD, EVERY_TOKEN, ControlVector, read_control_vector
from alignez_local.formats.profile import SteeringProfile, load_profile
from alignez_local.llama.engine import Edit, EditFn, Engine
from alignez_local.specs import MAX_STRENGTH, check_strength, parse_steering_spec

# A request's choice: name -> strength, only the non-zero ones.
Choice = Mapping[str, float]


@dataclass(frozen=True)
class Served:
    """One loaded vector or profile, under the name requests use."""

    name: str
    kind: str  # "vector" or "profile"
    path: str
    item: ControlVector | SteeringProfile
    default_strength: float

    @property
    def layers(self) -> list[int]:
        return list(self.item.layers)

    def placed(self, placement: str) -> bool:
        """True for a vector added at ``placement`` (``control_vector.PLACEMENTS``, ``answer-after:N``)."""
        return self.kind == "vector" and self.item.placement == placement  # type: ignore[union-attr]

    @property
    def on_answer(self) -> bool:
        """True for a vector added to the answer's tokens only (answer-only or answer-after:N)."""
        return self.kind == "vector" and self.item.placement != EVERY_TOKEN  # type: ignore[union-attr]

    def describe(self) -> dict[str, Any]:
        """Return the JSON description ``GET /v1/steering`` shows."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "path": self.path,
            "layers": self.layers, "default_strength": self.default_strength,
        }
        if isinstance(self.item, ControlVector) and isinstance(self.item.gate, Gates):
            g = self.item.gate
            # "layer" for one gate, as before several gates existed; "layers" and "rule" for any number.
            out["gate"] = {"site": GATE_SITE, **({"layer": g.layers[0]} if len(g) == 1 else {}),
                           "layers": g.layers, "rule": g.rule}
        if isinstance(self.item, ControlVector):
            out["placement"] = self.item.placement
        if isinstance(self.item, SteeringProfile):
            out["site"] = self.item.site
            out["method"] = self.item.method
            out["axis"] = dict(self.item.axis)
        return out


@dataclass(frozen=True)
class BatchEdit:
    """One ``Engine.activation_edit`` to enter for a batch."""

    fn: EditFn
    layers: list[int]
    site: str
    all_tokens: bool
    # LiveSteering's per-sequence vector edit (``LiveSteering.shared_vector`` says when it may run
    # as llama.cpp's in-graph control vector instead).
    vectors: bool = False


def parse_named_spec(spec: str) -> tuple[str | None, str, float | None]:
    """Return (name or None, path, strength or None) from ``[NAME=]FILE[:STRENGTH]``."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or os.path.exists(spec) or os.sep in name:
        name, rest = "", spec  # no NAME= part (or a path that itself contains "=")
    parsed = parse_steering_spec(rest)
    return (name or None), parsed.path, parsed.strength


class SteeringSet:
    """The named vectors and profiles of a server."""

    def __init__(self, items: Sequence[Served], n_layer: int, top_n: int = DEFAULT_TOP_N) -> None:
        self.items = {s.name: s for s in items}
        self.n_layer = n_layer
        self.top_n = top_n

    @classmethod
    def load(
        cls, engine: Engine, vectors: Sequence[str] = (), profiles: Sequence[str] = (), top_n: int = DEFAULT_TOP_N
    ) -> tuple["SteeringSet", list[str]]:
        """Return the set loaded from ``[NAME=]FILE[:STRENGTH]`` specs, and compatibility warnings."""
        if top_n < 1:
            raise AlignezError(f"--top-n {top_n} is out of range; use 1 or more")
        items: list[Served] = []
        warnings: list[str] = []
        for kind, specs in (("vector", vectors), ("profile", profiles)):
            for spec in specs:
                name, path, strength = parse_named_spec(spec)
                name = name or Path(path).stem
                if any(s.name == name for s in items):
                    raise AlignezError(f"two steering files are named {name!r}; give one a name with NAME=FILE")
                item = read_control_vector(path) if kind == "vector" else load_profile(path)
                if isinstance(item, ControlVector) and item.form != ADD:
                    raise AlignezError(f"{name}: {path} is a {item.form} vector, which alignez serve cannot apply yet; "
                                       "steer with it in alignez chat, alignez eval or the Python API")
                warnings += [f"{name}: {w}" for w in item.check_compatible(engine.n_layer, engine.n_embd, engine.arch)]
                own = getattr(item, "default_strength", None)  # the file's calibrated strength, if any
                default = strength if strength is not None else (1.0 if own is None else float(own))
                items.append(Served(name, kind, str(Path(path).resolve()), item, check_strength(default)))
        return cls(items, engine.n_layer, min(top_n, engine.n_layer)), warnings

    @property
    def defaults(self) -> dict[str, float]:
        """Return the choice of a request that says nothing: every item at its default strength."""
        return {n: s.default_strength for n, s in self.items.items() if s.default_strength != 0}

    def resolve(self, value: object) -> dict[str, float]:
        """Return a request's ``steering`` field as {name: strength}, zero strengths left out.

        None = the server's defaults; 0 or {} = unsteered. Raises AlignezError for anything else
        that is not {known name: number within the strength limit}.
        """
        if value is None:
            return self.defaults
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            return {}
        if not isinstance(value, dict):
            raise AlignezError('steering must be an object like {"helpful": 0.8} (or 0 / {} for none)')
        out: dict[str, float] = {}
        for name, strength in value.items():
            if name not in self.items:
                known = ", ".join(sorted(self.items)) or "none (start the server with --vector or --profile)"
                raise AlignezError(f"unknown steering name {reprlib.repr(name)}; loaded: {known}")
            # An int of 400 digits is a number too, but too large for a float: out of range, not a crash.
            if (isinstance(strength, bool) or not isinstance(strength, (int, float))
                    or (isinstance(strength, float) and not math.isfinite(strength))):
                raise AlignezError(f"steering strength for {name!r} must be a number, got {reprlib.repr(strength)}")
            check_strength(float(strength) if abs(strength) < 1e300 else math.inf, f"steering strength for {name!r}")
            if strength != 0:
                out[name] = float(strength)
        return out

    def describe(self) -> dict[str, Any]:
        """Return the JSON body of ``GET /v1/steering``."""
        return {
            "object": "list",
            "data": [s.describe() for s in self.items.values()],
            "defaults": self.defaults,
            "max_strength": MAX_STRENGTH,
            "top_n": self.top_n,
        }

    # --- one batch ---------------------------------------------------------------------------

    def batch_edits(self, engine: Engine, prompts: Sequence[str], choices: Sequence[Choice]) -> list[BatchEdit]:
        """Return the edits that steer each prompt of a batch by its own choice, vectors first.

        Must run before the edits are entered: profile plans read the UNSTEERED model (as
        ``Steering.applied`` does). Vectors come first so a profile on ``l_out`` sees the vector
        already added, as it does under llama.cpp's in-graph control vector.
        """
        edits: list[BatchEdit] = []
        opens = self._gates(engine, prompts, choices)
        # Every-token vectors edit every row; those on the answer's tokens the output rows, from their onset.
        per_key: dict[int, dict[int, np.ndarray]] = {}
        answer: dict[int, AnswerSums] = {}
        for key, choice in enumerate(choices):
            slots = [VectorSlot(n, self.items[n].item, w) for n, w in choice.items()  # type: ignore[arg-type]
                     if self.items[n].kind == "vector" and opens.get((n, key), True)]
            every = Steering(vectors=[v for v in slots if v.vector.placement == EVERY_TOKEN]).vector_sum(self.n_layer)
            if every:
                per_key[key] = every
            groups = Steering(vectors=slots).answer_sums(self.n_layer)
            if groups:
                answer[key] = groups
        layers = sorted({layer for vecs in per_key.values() for layer in vecs})
        if layers:
            edits.append(BatchEdit(vector_edit(per_key), layers, "l_out", True))
        ans_layers = sorted({L for groups in answer.values() for _, vecs in groups for L in vecs})
        if ans_layers:
            edits.append(BatchEdit(AnswerEdit(answer, ans_layers), ans_layers, "l_out", False))
        by_site: dict[str, list[tuple[float, list[EditPlan]]]] = {}
        for name, served in self.items.items():
            if served.kind == "profile":
                weighted = self._profile_plans(engine, prompts, choices, name)
                if weighted:
                    by_site.setdefault(served.item.site, []).extend(weighted)  # type: ignore[union-attr]
        for site, weighted in by_site.items():
            layers = sorted({L for _, plans in weighted for p in plans for L in p.directions})
            if layers:
                edits.append(BatchEdit(profile_edit(weighted), layers, site, False))
        return edits

    def _gates(self, engine: Engine, prompts: Sequence[str], choices: Sequence[Choice]) -> dict[tuple[str, int], bool]:
        """Return (gated vector name, batch key) -> does its gate open on that prompt, for the keys that chose it."""
        out: dict[tuple[str, int], bool] = {}
        for name, served in self.items.items():
            if served.kind != "vector" or served.item.gate is None:  # type: ignore[union-attr]
                continue
            keys = [k for k, c in enumerate(choices) if c.get(name, 0) != 0]
            if keys:
                slot = VectorSlot(name, served.item, 1.0)  # type: ignore[arg-type]
                for k, ok in zip(keys, Steering().gates(engine, [prompts[k] for k in keys], slot)):
                    out[(name, k)] = bool(ok)
        return out

    def _profile_plans(
        self, engine: Engine, prompts: Sequence[str], choices: Sequence[Choice], name: str
    ) -> list[tuple[float, list[EditPlan]]]:
        """Return (weight, plan per batch key) groups for one profile: one group per distinct weight,
        with empty plans for the keys that did not ask for it at that weight."""
        keys = [k for k, c in enumerate(choices) if c.get(name, 0) != 0]
        if not keys:
            return []
        slot = ProfileSlot(name, self.items[name].item, 1.0)  # type: ignore[arg-type]
        plans = Steering(top_n=self.top_n).plans(engine, [prompts[k] for k in keys], slot)
        by_key = dict(zip(keys, plans))
        empty = EditPlan({}, {})
        groups: dict[float, list[EditPlan]] = {}
        for k in keys:
            w = choices[k][name]
            groups.setdefault(w, [empty] * len(choices))[k] = by_key[k]
        return list(groups.items())


class LiveSteering:
    """Per-sequence steering of a running decode that sequences join and leave between steps.

    Entering an edit clears the KV cache (``Engine.activation_edit``), so the edits are entered
    once per run (``edits``) and cover every layer a loaded vector or profile can touch; they look
    each row's key up in tables that change between decode steps (``start`` / ``forget``), on the
    engine thread, so never while a decode reads them. A key with no entry is left unchanged,
    which is what keeps one request's steering off every other request's tokens.

    A profile's plan needs the UNSTEERED activation at the request's last prompt token (as
    ``Steering.plans`` reads it with ``Engine.capture``, which would clear the running cache): the
    request's prompt is first decoded as a prefill-only planning sequence, whose rows the profile
    edits record instead of editing (``plan``), then the plan is made from them (``start``).
    """

    def __init__(self, steering: SteeringSet) -> None:
        self.set = steering
        self.profiles = [s for s in steering.items.values() if s.kind == "profile"]
        self.gated = [s for s in steering.items.values() if s.kind == "vector" and s.item.gate is not None]  # type: ignore[union-attr]
        self._vectors: dict[int, dict[int, np.ndarray]] = {}  # key -> its every-token vectors' sum
        self._answer: dict[int, AnswerSums] = {}  # key -> its vectors on the answer's tokens, by onset
        self._answer_edit: AnswerEdit | None = None  # counts each key's answer rows (``forget`` restarts it)
        self._sums: dict[tuple[tuple[str, float], ...], dict[int, np.ndarray]] = {}  # choice -> its vector sum
        self._vec_edit: Edit | None = None  # the entered vector edit while ``place`` may pause it
        self._tags: dict[int, tuple[tuple[str, float], ...]] = {}  # key -> its vectors' (name, strength)
        self._plans: dict[int, list[tuple[str, float, EditPlan]]] = {}  # key -> (site, strength, plan)
        self._planning: set[int] = set()
        self._captured: dict[int, dict[tuple[str, int], np.ndarray]] = {}

    @property
    def needs_planning(self) -> bool:
        """True when some requests must be decoded once unsteered first (a profile or a gated vector is loaded).

        ``serve --deterministic`` then plans every request, steered or not, although only profile
        and gated requests use the plan: a planning prefill only for them would make the decode's
        batch shapes depend on the neighbours' steering, and llama.cpp's numerics depend on batch
        shapes (on SmolLM2 an unsteered answer then changed with its neighbours' choice). The
        default mode plans only the requests that need it (``uses_plan``), since flash attention
        and prompt reuse make the bits depend on the neighbours anyway.
        """
        return bool(self.profiles or self.gated)

    def uses_plan(self, choice: Choice) -> bool:
        """True when ``choice`` needs the unsteered planning prefill: it names a profile or a gated vector."""
        return any(s.name in choice for s in (*self.profiles, *self.gated))

    def edits(self) -> list[BatchEdit]:
        """Return the edits to enter for a whole run, vectors first (as ``batch_edits`` orders them)."""
        n = self.set.n_layer
        out: list[BatchEdit] = []
        vec_layers = sorted({L for s in self.set.items.values() if s.placed(EVERY_TOKEN) for L in s.layers if 1 <= L < n})
        if vec_layers:
            out.append(BatchEdit(vector_edit(self._vectors), vec_layers, "l_out", True, vectors=True))
        ans_layers = sorted({L for s in self.set.items.values() if s.on_answer for L in s.layers if 1 <= L < n})
        if ans_layers:
            self._answer_edit = AnswerEdit(self._answer, ans_layers)
            out.append(BatchEdit(self._answer_edit, ans_layers, "l_out", False))
        by_site: dict[str, set[int]] = {}
        for prof in self.profiles:
            by_site.setdefault(prof.item.site, set()).update(L for L in prof.layers if 0 <= L < n)  # type: ignore[union-attr]
        for site, layers in by_site.items():
            if layers:
                out.append(BatchEdit(self._profile_edit(site), sorted(layers), site, False))
        gate_layers = sorted({L for g in self.gated for L in g.item.gate.layers if L < n})  # type: ignore[union-attr]
        if gate_layers:
            out.append(BatchEdit(self._gate_record, gate_layers, GATE_SITE, False))
        return out

    def enter(self, engine: Engine, stack: ExitStack, in_graph: bool = True) -> None:
        """Enter this run's ``edits`` on ``engine`` inside ``stack`` (cleared KV cache, as entering
        any edit does); ``in_graph``: let ``place`` move the vector edit into llama.cpp's graph."""
        for e in self.edits():
            entered = stack.enter_context(engine.activation_edit(e.fn, e.layers, e.site, e.all_tokens))
            if e.vectors and in_graph:
                self._vec_edit = entered
        stack.callback(self._leave, engine)  # runs first on exit: before the edits are left

    def _leave(self, engine: Engine) -> None:
        self._vec_edit = None
        engine.set_graph_vector(None)

    def place(self, engine: Engine, keys: Sequence[int]) -> bool:
        """Before a decode step of the sequences ``keys``: when the vector edit would add the same
        sum to all of them (``shared_vector``, or nothing to any), llama.cpp adds it in its graph
        and the edit is paused, which spares a graph split and a Python callback per vector layer
        and step; else the edit runs and the in-graph vector is off. Return True when in the graph."""
        if self._vec_edit is None:
            return False
        shared, vec = self.shared_vector(keys)
        engine.set_graph_vector(vec if shared else None)
        engine.pause_edit(self._vec_edit, shared)
        return shared

    def plan(self, key: int) -> None:
        """Record the rows of ``key`` (a prefill-only sequence of a prompt) at every profile layer."""
        self._planning.add(key)

    def start(self, key: int, choice: Choice, planned_by: int | None = None) -> None:
        """Steer ``key``'s rows by ``choice``; profile plans and gates come from the rows ``planned_by`` recorded."""
        acts = self._captured.pop(planned_by, {}) if planned_by is not None else {}
        chosen = [VectorSlot(n, self.set.items[n].item, w) for n, w in choice.items()  # type: ignore[arg-type]
                  if self.set.items[n].kind == "vector" and self._gate_opens(self.set.items[n], acts)]
        slots = [v for v in chosen if v.vector.placement == EVERY_TOKEN]
        answer = Steering(vectors=chosen).answer_sums(self.set.n_layer)
        if self._answer_edit is not None:
            self._answer_edit.forget(key)  # the key's rows are counted from its first output row
        if answer:
            # Output rows only: never in the prompt's KV cells, so not in ``cells_tag`` either.
            self._answer[key] = answer
        if slots:
            # Keys that chose alike share one sum (computed the same way, so the same values):
            # ``shared_vector`` then sees at once that they are steered alike.
            sig = tuple((s.name, s.strength) for s in slots)
            same = self._sums.get(sig)
            if same is None:
                same = self._sums[sig] = Steering(vectors=slots).vector_sum(self.set.n_layer)
            self._vectors[key] = same
            self._tags[key] = sig
        if planned_by is not None:
            self._planning.discard(planned_by)
        plans = [(p.item.site, choice[p.name], self._plan_one(p, acts)) for p in self.profiles if choice.get(p.name, 0) != 0]  # type: ignore[union-attr]
        if plans:
            self._plans[key] = plans

    def cells_tag(self, key: int) -> tuple[tuple[str, float], ...]:
        """Return what makes ``key``'s prompt KV cells what they are: the vectors (name, strength)
        added to every token, in order; () for none. Profiles edit output rows only, and prompt
        reuse never keeps a prompt's last token, so they do not count."""
        return self._tags.get(key, ())

    def shared_vector(self, keys: Sequence[int]) -> tuple[bool, dict[int, np.ndarray] | None]:
        """Return (True, v) when the vector edit adds the same ``v`` to every row of ``keys`` (the
        sequences of the next decode step; v None: adds nothing to any), else (False, None).

        Then llama.cpp's own control vector ``v`` (or none) computes what the edit would, bit for
        bit (the same float32 additions on the same ``l_out`` nodes), without splitting the graph
        for a Python callback at every vector layer. Planning sequences have no vector, so a step
        holding one is shared only when nobody in it is steered by a vector.
        """
        first = self._vectors.get(keys[0]) if keys else None
        if all(self._vectors.get(k) is first for k in keys):
            return True, first
        return False, None

    def forget(self, key: int) -> None:
        """Drop everything held for ``key`` (its sequence has left)."""
        self._tags.pop(key, None)
        self._answer.pop(key, None)
        if self._answer_edit is not None:
            self._answer_edit.forget(key)
        gone = self._vectors.pop(key, None)
        if gone is not None and not any(v is gone for v in self._vectors.values()):
            self._sums = {sig: v for sig, v in self._sums.items() if v is not gone}
        self._plans.pop(key, None)
        self._planning.discard(key)
        self._captured.pop(key, None)

    def _gate_opens(self, vec: Served, acts: Mapping[tuple[str, int], np.ndarray]) -> bool:
        """Return whether a vector applies to a request: always when ungated, else by its gates on the recorded states."""
        gates = vec.item.gate  # type: ignore[union-attr]
        if not isinstance(gates, Gates):
            return True
        missing = [L for L in gates.layers if (GATE_SITE, L) not in acts]
        if missing:
            raise AlignezError(f"no planning activation for the gate of {vec.name} at {GATE_SITE}-{missing[0]}")
        return bool(gates.opens({L: acts[(GATE_SITE, L)] for L in gates.layers})[0])

    def _gate_record(self, layer: int, x: np.ndarray, keys: Sequence[int]) -> None:
        """Record the rows of planning sequences at a gate's layer (a profile on l_out may record them too: same rows)."""
        for row, key in enumerate(keys):
            if key in self._planning:
                self._captured.setdefault(key, {})[(GATE_SITE, layer)] = x[row].copy()

    def _plan_one(self, prof: Served, acts: Mapping[tuple[str, int], np.ndarray]) -> EditPlan:
        """Return one profile's plan from recorded activations, as ``Steering.plans`` makes it."""
        site = prof.item.site  # type: ignore[union-attr]
        subspaces = {L: s for L, s in prof.item.subspaces.items() if 0 <= L < self.set.n_layer}  # type: ignore[union-attr]
        missing = [L for L in subspaces if (site, L) not in acts]
        if missing:
            raise AlignezError(f"no planning activation for {prof.name} at {site}-{missing[0]}")
        return plan_edit({L: acts[(site, L)] for L in subspaces}, subspaces, top_n=self.set.top_n)

    def _profile_edit(self, site: str) -> EditFn:
        """Return the edit of one site: record planning rows, apply each steered key's plans."""

        def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray | None:
            touched = False
            for row, key in enumerate(keys):
                if key in self._planning:
                    self._captured.setdefault(key, {})[(site, layer)] = x[row].copy()
                    continue
                delta = None
                for psite, strength, plan in self._plans.get(key, ()):
                    dirs = plan.directions.get(layer) if psite == site else None
                    if dirs is not None:
                        # Summed from zero in the profiles' order, then added: profile_edit's arithmetic.
                        delta = np.zeros_like(x[row]) if delta is None else delta
                        delta += strength * edit_delta(x[row], dirs)
                if delta is not None:
                    x[row] = x[row] + delta
                    touched = True
            return x if touched else None

        return edit

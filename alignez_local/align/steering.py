"""Apply steering to an engine: control vectors (constant, additive) and profiles (the exact,
input-dependent AlignEZ edit), each with its own strength, live-adjustable.

The exact edit needs to know the prompt before it edits: for every prompt, a planning pass reads
the profile's site at the last prompt token (``Engine.capture``), ``plan_edit`` keeps the
directions the prompt does not already carry and picks the top-n layers, and then generation runs
with an eval-callback edit that applies the rule to the last prompt token and to every generated
token, per sequence. Several profiles are combined as a strength-weighted sum of their deltas, each
computed from the same unedited activation.

A ``clamp`` control vector (``ControlVector.form``) is an eval-callback edit of its own: each row's
component along the unit direction is raised to the file's floor plus strength x the direction's
norm, and a row already there is left alone, so an answer already in the behaviour is not pushed
further (issue 31: the constant addition keeps pushing, and the capitals vector loops). Clamps of
several vectors do not add up, so each is its own edit, applied in the order loaded. A ``keep-norm``
vector is such an edit too: each row gets the vector added and is scaled back to its own length.

A gated control vector (``ControlVector.gate``: one gate, or several combined by ``any`` / ``all``)
is decided the same way before generation: its gates read each prompt's unsteered state at their
layers, and the vector is then added at every token only to the prompts the gates opened on.

A prompt whose gates stay shut must decode EXACTLY as an unsteered prompt (issue 20). Adding the
vector to some rows of a batch does not change the other rows' bits by itself (the edit writes only
its own rows, and the eval callback splitting the graph changes no value: measured on the tiny
model and on Qwen2.5-Coder-0.5B Q4_K_M, a no-op edit of every row of ``l_out`` leaves every logit
bit-identical). What changes them is the SCHEDULE: a steered prompt answers differently, so it ends
at another step (a refusal after 12 tokens instead of 48), the next prompt takes its slot earlier,
and from then on the other sequences decode in batches of other sizes with their KV cells
elsewhere. llama.cpp's CPU kernels sum in an order that depends on both (rows per ubatch, cell
placement), so their logits move in the last bits and greedy answers part after a near tie (Qwen,
16 prompts, 48 tokens: every shut sequence's log-probabilities differed and 3 of 12 shut answers
changed although no edit touched them). No per-sequence trick inside one batch can avoid that.

So ``Steering.generate`` never decodes a shut prompt beside a steered one. A batch whose gates
disagree is decoded in two runs: the shut prompts, in their order, exactly as the steering without
its gated vectors decodes them (the same call, ``without_gated().generate``), then the opened
prompts, steered. The promise, stated precisely: a prompt whose gates all stay shut gets, token for
token and bit for bit in its log-probabilities, what ``without_gated().generate`` gives it called
on the shut prompts of the call; a prompt alone (chat) gets its unsteered answer. Nothing is
decoded twice. What it does not promise: the answer a shut prompt gets beside the OTHER prompts
unsteered, since the shut prompts' batch depends on which neighbours opened. ``alignez eval``
compares each answer with the unsteered answer of the same chunk, and asks for that
(``reference=True``): the whole batch is first decoded as the reference (the shut prompts' answers
are taken from it), then the opened prompts again, steered, at the price of decoding those twice
(issue 29 measured 1.63x unsteered for 48 mixed prompts, the gates read alone included). A batch
whose prompts all agree is one run either way: nothing gated (the reference itself) or every prompt
with the same gated vectors open, which are then added as llama.cpp's own control vector
(``llama_set_adapter_cvec``, no eval callback: what ``--control-vector`` does).

A prompt's gate decision is the one it gets read ALONE (``read_alone``: a capture of that prompt
by itself): read in a batch, a prompt's state moves with its neighbours and with the shared prefix
decoded once (on Qwen up to 1.5% of its norm, 0.018 along the shipped gate's direction), so a
prompt near the threshold would open or not depending on the batch it came in (docs/results.md §8:
one benign prompt 0.002 below it opened in an evaluation batch). Read alone, the decision is a
function of the prompt: the same in chat, eval and any batch. Reading every prompt alone cost a
full prefill each (21.5 s of the 82 s above), so ``read_gates`` reads the batch together, in one
capture that stops at the deepest gate layer, and reads again alone only the prompts whose outcome
rests on a projection the batch may have moved across a threshold (``gate_reading.BATCH_MARGIN``):
the others decide as alone would.
"""

from __future__ import annotations

# size: the one owner of how steering reaches an engine (vectors, clamps, placements, gates, profiles);
# most of the length is the docstring's account of what a gated batch promises and why.

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.formats.gate import GATE_SITE, Gates
from alignez_local.formats.control_vector import (
    ADD,
    CLAMP,
    KEEP_NORM,
    EVERY_TOKEN,
    ControlVector,
    placement_onset,
    placement_words,
    read_control_vector,
    unit,
)
from alignez_local.align.edit import EditPlan, edit_delta, plan_edit
from alignez_local.align.gate_reading import read_gates
from alignez_local.llama.engine import Completion, EditFn, Engine, Sampling, TokenFn
from alignez_local.errors import AlignezError
from alignez_local.formats.profile import SteeringProfile, load_profile
from alignez_local.specs import SteeringSpec, parse_layer_range, parse_steering_spec

DEFAULT_TOP_N = 5


# Where a slot's strength came from, shown by describe() (chat's /vectors).
GIVEN, FILE_DEFAULT, PLAIN_DEFAULT = "given", "file default", "default"


@dataclass
class VectorSlot:
    """A control vector and its strength (the multiplier of every direction)."""

    name: str
    vector: ControlVector
    strength: float = 1.0
    origin: str = GIVEN  # where ``strength`` came from (GIVEN, FILE_DEFAULT, PLAIN_DEFAULT or a caller's word)
    path: str | None = None


@dataclass
class ProfileSlot:
    """A steering profile and its strength (the multiplier of the exact edit's delta)."""

    name: str
    profile: SteeringProfile
    strength: float = 1.0
    origin: str = GIVEN
    path: str | None = None


@dataclass
class Steering:
    """Everything that steers generation: vectors, profiles, a layer range and an on/off switch."""

    vectors: list[VectorSlot] = field(default_factory=list)
    profiles: list[ProfileSlot] = field(default_factory=list)
    layer_range: tuple[int, int] | None = None
    top_n: int = DEFAULT_TOP_N
    enabled: bool = True
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_specs(
        cls,
        engine: Engine,
        vectors: Sequence[str | SteeringSpec] = (),
        profiles: Sequence[str | SteeringSpec] = (),
        layers: str | None = None,
        top_n: int = DEFAULT_TOP_N,
    ) -> "Steering":
        """Return steering built from ``FILE[:STRENGTH]`` specs (text or parsed), checked against the model.

        A spec without a strength gets the file's own calibrated default, else 1.
        """
        if top_n < 1:
            raise AlignezError(f"--top-n {top_n} is out of range; use 1 or more")
        # More layers than the model has simply means every candidate layer.
        st = cls(layer_range=parse_layer_range(layers, engine.n_layer), top_n=min(top_n, engine.n_layer))
        used: set[str] = set()
        for spec in map(_as_spec, vectors):
            cv = read_control_vector(spec.path)
            st.warnings += cv.check_compatible(engine.n_layer, engine.n_embd, engine.arch)
            strength, origin = resolve_strength(spec, cv)
            st.vectors.append(VectorSlot(_unique(Path(spec.path).stem, used), cv, strength, origin, spec.path))
        for spec in map(_as_spec, profiles):
            prof = load_profile(spec.path)
            st.warnings += prof.check_compatible(engine.n_layer, engine.n_embd, engine.arch)
            strength, origin = resolve_strength(spec, prof)
            st.profiles.append(ProfileSlot(_unique(Path(spec.path).stem, used), prof, strength, origin, spec.path))
        return st

    @classmethod
    def vector(cls, vector: ControlVector, strength: float = 1.0, name: str | None = None) -> "Steering":
        """Return steering by one control vector at ``strength`` (the commonest steering there is)."""
        return cls(vectors=[VectorSlot(name or vector.name, vector, strength)])

    @property
    def active(self) -> bool:
        """True when something would change the model's output."""
        return self.enabled and (
            any(s.strength != 0 for s in self.slots)
        )

    @property
    def slots(self) -> list[VectorSlot | ProfileSlot]:
        """Every loaded vector and profile, vectors first (names are unique across both)."""
        return [*self.vectors, *self.profiles]

    def _in_range(self, layer: int) -> bool:
        r = self.layer_range
        return r is None or r[0] <= layer <= r[1]

    def vector_sum(self, n_layer: int, slots: Sequence[VectorSlot] | None = None) -> dict[int, np.ndarray]:
        """Return layer -> the sum of strength x direction over ``slots`` (default: all vectors),
        inside the layer range."""
        total: dict[int, np.ndarray] = {}
        for slot in self.vectors if slots is None else slots:
            for layer, d in slot.vector.directions.items():
                if self._in_range(layer) and 1 <= layer < n_layer and slot.strength != 0:
                    total[layer] = total.get(layer, 0) + slot.strength * d
        return total

    def describe(self) -> list[str]:
        """Return one line per active vector/profile (what, strength, layers) for display."""
        lines = []
        for v in self.vectors:
            gate = f", gated at {v.vector.gate.summary()}" if isinstance(v.vector.gate, Gates) else ""
            where = f", {placement_words(v.vector.placement)}" if v.vector.placement != EVERY_TOKEN else ""
            where += {CLAMP: ", clamped", KEEP_NORM: ", norm kept"}.get(v.vector.form, "")
            lines.append(f"vector  {v.name}: {_strength_text(v)}, layers {_span(v.vector.layers)}{gate}{where}")
        for p in self.profiles:
            lines.append(
                f"profile {p.name}: {_strength_text(p)}, {p.profile.method} on {p.profile.site}, "
                f"layers {_span(p.profile.layers)}, top {self.top_n} per prompt"
            )
        if self.layer_range:
            lines.append(f"layer range {self.layer_range[0]}-{self.layer_range[1]}")
        lines.append("steering is " + ("on" if self.enabled else "off"))
        return lines

    def plans(self, engine: Engine, prompts: Sequence[str], slot: ProfileSlot) -> list[EditPlan]:
        """Return one edit plan per prompt for a profile, from a capture at its last prompt token."""
        subspaces = {L: s for L, s in slot.profile.subspaces.items() if self._in_range(L)}
        if not subspaces:
            return [EditPlan({}, {}) for _ in prompts]
        layers = sorted(subspaces)
        acts = engine.capture(prompts, layers, site=slot.profile.site)
        return [
            plan_edit({L: acts[i, j] for j, L in enumerate(layers)}, subspaces, top_n=self.top_n)
            for i in range(len(prompts))
        ]

    def gates(self, engine: Engine, prompts: Sequence[str], slot: VectorSlot) -> np.ndarray:
        """Return, for a gated vector, one bool per prompt: do its gates open (unsteered state,
        decided as the prompt read alone decides, so the answer does not depend on the batch)?"""
        gate = slot.vector.gate
        if not isinstance(gate, Gates):
            return np.ones(len(prompts), dtype=bool)
        return read_gates(engine, prompts, [gate])[:, 0]

    def gated_slots(self, n_layer: int) -> list[int]:
        """Return the indices (in ``vectors``) of the gated vectors that would steer anything:
        non-zero strength and a direction inside the layer range."""
        return [i for i, v in enumerate(self.vectors)
                if v.vector.gate is not None and v.strength != 0 and self.vector_sum(n_layer, [v])]

    def open_gates(self, engine: Engine, prompts: Sequence[str]) -> list[frozenset[int]]:
        """Return, per prompt, the indices (in ``vectors``) of the gated vectors whose gates open on
        it (unsteered, decided as the prompt read alone decides: ``read_gates``; empty when no gated
        vector is active)."""
        idx = self.gated_slots(engine.n_layer)
        if not idx or not self.enabled:
            return [frozenset()] * len(prompts)
        opened = read_gates(engine, prompts, [self.vectors[i].vector.gate for i in idx])  # type: ignore[misc]
        return [frozenset(i for i, ok in zip(idx, row) if ok) for row in opened]

    def gated_sums(self, engine: Engine, prompts: Sequence[str]) -> dict[int, dict[int, np.ndarray]]:
        """Return prompt index -> layer -> the summed gated vectors whose gate opened on that prompt."""
        return self._sums(self.open_gates(engine, prompts), engine.n_layer)

    def _sums(self, opens: Sequence[frozenset[int]], n_layer: int,
              placement: str | None = None) -> dict[int, dict[int, np.ndarray]]:
        """Return key -> layer -> the sum of its open vectors (only those at ``placement``, when given)."""
        per_key: dict[int, dict[int, np.ndarray]] = {}
        for key, which in enumerate(opens):
            slots = [self.vectors[i] for i in sorted(which) if self.vectors[i].vector.form == ADD
                     and (placement is None or self.vectors[i].vector.placement == placement)]
            vecs = self._float32(self.vector_sum(n_layer, slots)) if slots else {}
            if vecs:
                per_key[key] = vecs
        return per_key

    def answer_sums(self, n_layer: int, slots: Sequence[VectorSlot] | None = None) -> list[tuple[int, dict[int, np.ndarray]]]:
        """Return (onset, layer -> float32 sum) for the added vectors among ``slots`` (default: all)
        placed on the answer's tokens, one per onset (``placement_onset``), by onset: the vectors of
        one onset are summed first and added as one, as answer-only vectors always were."""
        by_onset: dict[int, list[VectorSlot]] = {}
        for v in self.vectors if slots is None else slots:
            onset = placement_onset(v.vector.placement)
            if onset is not None and v.vector.form == ADD:
                by_onset.setdefault(onset, []).append(v)
        sums = [(n, self._float32(self.vector_sum(n_layer, group))) for n, group in sorted(by_onset.items())]
        return [(n, vecs) for n, vecs in sums if vecs]

    def _answer_edit(self, stack: ExitStack, engine: Engine, per_key: Mapping[int, AnswerSums]) -> None:
        """Enter one ``AnswerEdit`` for ``per_key`` (key -> its answer vectors by onset), if it adds anything."""
        layers = sorted({L for groups in per_key.values() for _, vecs in groups for L in vecs})
        if layers:
            stack.enter_context(engine.activation_edit(AnswerEdit(per_key, layers), layers, site=GATE_SITE))

    def clamp_targets(self, slot: VectorSlot, n_layer: int) -> dict[int, tuple[np.ndarray, float, float]]:
        """Return layer -> (unit direction, target component, sign of the strength) for a clamp vector:
        the target is the plain answers' mean component plus strength x the direction's norm."""
        floors = slot.vector.clamp_floor
        return {L: (unit(d), floors[L] + slot.strength * float(np.linalg.norm(d.astype(np.float64))),
                    1.0 if slot.strength > 0 else -1.0)
                for L, d in slot.vector.directions.items()
                if self._in_range(L) and 1 <= L < n_layer and slot.strength != 0}

    def _form_edits(self, stack: ExitStack, engine: Engine, n_prompts: int, opens: Sequence[frozenset[int]] | None,
                    slots: Sequence[int]) -> None:
        """Register one edit per clamp or keep-norm vector in ``slots`` (indices in ``vectors``), on
        every prompt (``opens`` None) or on the prompts whose gates opened it."""
        for i in slots:
            slot = self.vectors[i]
            keys = [k for k in range(n_prompts) if opens is None or i in opens[k]]
            if slot.vector.form == CLAMP:
                targets = self.clamp_targets(slot, engine.n_layer)
                edit, layers = clamp_edit(dict.fromkeys(keys, targets)), sorted(targets)
            else:
                vecs = self._float32(self.vector_sum(engine.n_layer, [slot]))
                edit, layers = norm_kept_edit(dict.fromkeys(keys, vecs)), sorted(vecs)
            if layers and keys:
                stack.enter_context(engine.activation_edit(edit, layers, site=GATE_SITE,
                                                           all_tokens=slot.vector.placement == EVERY_TOKEN))

    @staticmethod
    def _float32(vecs: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        # float32, as an edit adds it to float32 rows (what ggml_add does for a control vector)
        return {L: np.asarray(v, dtype=np.float32) for L, v in vecs.items()}

    def without_gated(self) -> "Steering":
        """Return this steering with its gated vectors left out: what a prompt whose gates all stay
        shut must get, bit for bit (the reference ``generate`` runs the shut prompts through)."""
        return dataclasses.replace(self, vectors=[v for v in self.vectors if v.vector.gate is None], warnings=list(self.warnings))

    @contextmanager
    def applied(self, engine: Engine, prompts: Sequence[str]) -> Iterator[None]:
        """Steer ``engine`` for ``prompts`` inside this block (nothing when off).

        Gated vectors reach only the prompts their gate opens on. For prefill-only work (logits,
        captures, likelihoods) the shut prompts' results are then bit-identical to unsteered ones
        in the same batch; for generation use ``generate``: inside this block a steered prompt that
        ends at another step changes the schedule of the others (see the module docstring).
        """
        with self._applied(engine, prompts, self.open_gates(engine, prompts)):
            yield

    @contextmanager
    def _applied(self, engine: Engine, prompts: Sequence[str], opens: Sequence[frozenset[int]]) -> Iterator[None]:
        """``applied`` with the gate decisions already read (``open_gates`` of these prompts)."""
        with ExitStack() as stack:
            if self.active:
                # Plans read the UNSTEERED model: they are made before any steering is switched on.
                by_site: dict[str, list[tuple[float, list[EditPlan]]]] = {}
                for slot in self.profiles:
                    if slot.strength != 0:
                        by_site.setdefault(slot.profile.site, []).append((slot.strength, self.plans(engine, prompts, slot)))
                agreed = opens[0] if opens and all(o == opens[0] for o in opens) else None
                # Every prompt has the same gated vectors open (or none): they act like plain
                # vectors on this batch, through llama.cpp's own adapter; no eval callback.
                everywhere = [i for i, v in enumerate(self.vectors) if v.vector.gate is None or (agreed and i in agreed)]
                # A clamp or keep-norm vector is an edit of its own per vector: they do not add up.
                self._form_edits(stack, engine, len(prompts), None, [i for i in everywhere if self.vectors[i].vector.form != ADD])
                plain = [self.vectors[i] for i in everywhere if self.vectors[i].vector.form == ADD]
                vecs = self.vector_sum(engine.n_layer, [v for v in plain if v.vector.placement == EVERY_TOKEN])
                if vecs:
                    stack.enter_context(engine.control_vector(vecs))
                # Vectors on the answer's tokens: an edit of the output rows (the last prompt token
                # and each generated token, from each placement's onset on), which llama.cpp's
                # adapter cannot do.
                answer = self.answer_sums(engine.n_layer, plain)
                self._answer_edit(stack, engine, dict.fromkeys(range(len(prompts)), answer))
                if agreed is None:
                    # Prompts disagree: a per-sequence edit adds each prompt's open vectors to its
                    # own rows only (rows of shut prompts are left as they are).
                    gated = self._sums(opens, engine.n_layer, EVERY_TOKEN)
                    layers = sorted({L for vs in gated.values() for L in vs})
                    if layers:
                        stack.enter_context(engine.activation_edit(vector_edit(gated), layers, site=GATE_SITE, all_tokens=True))
                    self._answer_edit(stack, engine, {k: groups for k, which in enumerate(opens) if (groups := self.answer_sums(
                        engine.n_layer, [self.vectors[i] for i in sorted(which)]))})
                    self._form_edits(stack, engine, len(prompts), opens,
                                     [i for i in self.gated_slots(engine.n_layer) if self.vectors[i].vector.form != ADD])
                for site, weighted in by_site.items():
                    layers = sorted({L for _, plans in weighted for p in plans for L in p.directions})
                    if layers:
                        stack.enter_context(engine.activation_edit(profile_edit(weighted), layers, site=site))
            yield

    def generate(
        self,
        engine: Engine,
        prompts: Sequence[str],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        on_token: TokenFn | None = None,
        share_prefix: bool = False,
        *,
        reference: bool = False,
        opens: Sequence[frozenset[int]] | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Return completions for ``prompts`` under this steering (``share_prefix``, ``on_done``: as
        ``Engine.generate``'s; a prompt decoded twice for ``reference`` is told done once).

        A prompt whose gates all stay shut gets exactly (token for token, bit for bit in its
        log-probabilities) what ``without_gated().generate`` gives it called on the SHUT prompts of
        this call, in their order: when the gates disagree, the shut prompts are decoded as one run
        without the gated vectors and the opened ones as another, steered (module docstring). A
        prompt alone therefore gets exactly its unsteered answer when its gates stay shut.
        ``reference=True`` keeps the stronger promise for comparing answer by answer with an
        unsteered run of the same batch (``alignez eval``): the shut prompts get what
        ``without_gated().generate`` gives them called on ALL the prompts, because the whole batch is
        first decoded as that reference (the opened prompts are then decoded twice).
        ``opens``: the gate decisions already read (``open_gates`` of these prompts).
        """
        if not self.active or not prompts:
            return engine.generate(prompts, sampling, on_token=on_token, share_prefix=share_prefix, on_done=on_done)
        opens = self.open_gates(engine, prompts) if opens is None else list(opens)
        if all(o == opens[0] for o in opens):
            with self._applied(engine, prompts, opens):
                return engine.generate(prompts, sampling, on_token=on_token, share_prefix=share_prefix, on_done=on_done)
        sps = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(sps) != len(prompts):
            raise ValueError("one Sampling per prompt, or a single one for all")
        out: list[Completion | None] = [None] * len(prompts)
        shut = [i for i, o in enumerate(opens) if not o]
        if shut:
            # reference: the whole batch, in this order, without the gated vectors; the opened
            # prompts are decoded too (their answers dropped) so that every batch of this run has
            # the reference's shapes. Else the shut prompts alone: a run of their own, so nothing
            # steered shares (or reshapes) their batches.
            ran = list(range(len(prompts))) if reference else shut
            keep = set(shut)
            stream = None if on_token is None else (lambda k, text: on_token(ran[k], text) if ran[k] in keep else None)
            done = None if on_done is None else (lambda k: on_done(ran[k]) if ran[k] in keep else None)
            for i, c in zip(ran, self.without_gated().generate(engine, [prompts[i] for i in ran], [sps[i] for i in ran],
                                                               on_token=stream, share_prefix=share_prefix, on_done=done)):
                if i in keep:
                    out[i] = c
        opened = [i for i in range(len(prompts)) if opens[i]]
        sub = [prompts[i] for i in opened]
        stream = None if on_token is None else (lambda k, text: on_token(opened[k], text))
        done = None if on_done is None else (lambda k: on_done(opened[k]))
        with self._applied(engine, sub, [opens[i] for i in opened]):
            for i, c in zip(opened, engine.generate(sub, [sps[i] for i in opened], on_token=stream,
                                                    share_prefix=share_prefix, on_done=done)):
                out[i] = c
        return [c for c in out if c is not None]


def profile_edit(weighted: list[tuple[float, list[EditPlan]]]):
    """Return the eval-callback edit applying every profile's per-prompt plan, times its strength."""

    def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray | None:
        delta = np.zeros_like(x)
        touched = False
        for strength, plans in weighted:
            for row, key in enumerate(keys):
                dirs = plans[key].directions.get(layer)
                if dirs is not None:
                    delta[row] += strength * edit_delta(x[row], dirs)
                    touched = True
        return x + delta if touched else None

    return edit


# A key's vectors on the answer's tokens: (onset, layer -> float32 sum), by onset (``Steering.answer_sums``).
AnswerSums = Sequence[tuple[int, Mapping[int, np.ndarray]]]


class AnswerEdit:
    """The edit of vectors placed on the answer's tokens: each key's output rows (the last prompt
    token, then each generated token) get its vectors whose onset they have reached, where the
    key's k-th output row (k = 0: the last prompt token) has reached onsets <= k; answer-only is
    onset 0, ``answer-after:N`` onset N (the answer's first N tokens come from unedited rows).

    The rows are counted per key as the decodes come, at the lowest layer the edit is entered on
    (the graph runs layers in order, so each decode's count is made before any other layer reads
    it). A key's count starts at its first output row: a fixed batch enters a fresh edit per run;
    a live server's edit lasts the whole run and ``forget`` drops a key's count when its sequence
    starts and leaves. ``per_key`` may be a dict the caller fills between decode steps (``LiveSteering``).
    """

    def __init__(self, per_key: Mapping[int, AnswerSums], layers: Sequence[int]) -> None:
        self.per_key, self.first = per_key, min(layers)
        self.seen: dict[int, int] = {}  # key -> output rows counted so far
        self._index: list[int] = []  # this decode: each row's output index (-1: a key with nothing)

    def forget(self, key: int) -> None:
        """Drop ``key``'s count (its sequence starts or has left): its next output row is its 0th."""
        self.seen.pop(key, None)

    def __call__(self, layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray | None:
        if layer == self.first:
            self._index = []
            for key in keys:
                k = self.seen.get(key, 0) if key in self.per_key else -1
                if k >= 0:
                    self.seen[key] = k + 1
                self._index.append(k)
        touched = False
        for row, (key, k) in enumerate(zip(keys, self._index)):
            for onset, vecs in self.per_key.get(key, ()) if k >= 0 else ():
                v = vecs.get(layer)
                if onset <= k and v is not None:
                    x[row] = x[row] + v  # float32 + float32, as vector_edit adds
                    touched = True
        return x if touched else None


def per_row_edit(per_key: Mapping[int, Mapping[int, Any]], change: Callable[[np.ndarray, Any], np.ndarray | None]) -> EditFn:
    """Return an edit that, for each row whose key has a value at the layer (``per_key[key][layer]``),
    writes ``change(row, value)`` back into the row (None: leave it). The shared loop of the
    vector, clamp and keep-norm edits: rows of other keys, and other layers, stay as they are."""

    def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray | None:
        touched = False
        for row, key in enumerate(keys):
            value = per_key.get(key, {}).get(layer)
            if value is not None:
                new = change(x[row], value)
                if new is not None:
                    x[row] = new
                    touched = True
        return x if touched else None

    return edit


def vector_edit(per_key: Mapping[int, Mapping[int, np.ndarray]]) -> EditFn:
    """Return an edit adding each key's summed vector at a layer to that key's rows only."""
    # float32 + float32, exactly what ggml_add does for a control vector
    return per_row_edit(per_key, lambda row, v: row + v)


def clamp_edit(per_key: Mapping[int, Mapping[int, tuple[np.ndarray, float, float]]]) -> EditFn:
    """Return an edit raising each key's rows' component along a unit direction to a target, never
    past it (per layer: (unit direction, target, sign); a negative sign lowers to the target instead)."""

    def raise_to_target(row: np.ndarray, t: tuple[np.ndarray, float, float]) -> np.ndarray | None:
        u, target, sign = t
        gap = target - float(np.dot(row.astype(np.float64), u))
        # short of the target: move exactly to it along the direction
        return row + (gap * u).astype(np.float32) if gap * sign > 0 else None

    return per_row_edit(per_key, raise_to_target)


def norm_kept_edit(per_key: Mapping[int, Mapping[int, np.ndarray]]) -> EditFn:
    """Return an edit adding each key's vector at a layer to that key's rows, then scaling each such
    row back to the length it had (the direction turns, the norm stays)."""

    def add_keep_length(row: np.ndarray, v: np.ndarray) -> np.ndarray | None:
        old = row.astype(np.float64)
        new = old + v
        size = float(np.linalg.norm(new))
        return (new * (float(np.linalg.norm(old)) / size)).astype(np.float32) if size > 0 else None

    return per_row_edit(per_key, add_keep_length)


def _as_spec(spec: str | SteeringSpec) -> SteeringSpec:
    return spec if isinstance(spec, SteeringSpec) else parse_steering_spec(spec)


def resolve_strength(spec: SteeringSpec, obj: ControlVector | SteeringProfile) -> tuple[float, str]:
    """Return the strength to apply ``obj`` with and where it came from: the spec's own (GIVEN), the
    file's calibrated ``default_strength`` (FILE_DEFAULT), else 1 (PLAIN_DEFAULT)."""
    if spec.strength is not None:
        return spec.strength, GIVEN
    if obj.default_strength is not None:
        return obj.default_strength, FILE_DEFAULT
    return 1.0, PLAIN_DEFAULT


def _strength_text(slot: VectorSlot | ProfileSlot) -> str:
    return f"strength {slot.strength:g} ({slot.origin})"


def _unique(name: str, used: set[str]) -> str:
    base, n = name, 2
    while name in used:
        name = f"{base}-{n}"
        n += 1
    used.add(name)
    return name


def _span(layers: Sequence[int]) -> str:
    return f"{min(layers)}-{max(layers)} ({len(layers)})" if layers else "none"


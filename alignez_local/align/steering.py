"""Apply steering to an engine: control vectors (constant, additive) and profiles (the exact,
input-dependent AlignEZ edit), each with its own strength, live-adjustable.

The exact edit needs to know the prompt before it edits: for every prompt, a planning pass reads
the profile's site at the last prompt token (``Engine.capture``), ``plan_edit`` keeps the
directions the prompt does not already carry and picks the top-n layers, and then generation runs
with an eval-callback edit that applies the rule to the last prompt token and to every generated
token, per sequence. Several profiles are combined as a strength-weighted sum of their deltas, each
computed from the same unedited activation.

A gated control vector (``ControlVector.gate``) is decided the same way before generation: its
gate reads each prompt's unsteered state at its layer, and the vector is then added, as a
per-sequence edit of ``l_out`` at every token, only to the prompts the gate opened on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignez_local.formats.control_vector import GATE_SITE, ControlVector, read_control_vector
from alignez_local.align.edit import EditPlan, edit_delta, plan_edit
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
            gate = f", gated at layer {v.vector.gate.layer}" if v.vector.gate else ""
            lines.append(f"vector  {v.name}: {_strength_text(v)}, layers {_span(v.vector.layers)}{gate}")
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
        """Return, for a gated vector, one bool per prompt: does its gate open (unsteered state)?"""
        gate = slot.vector.gate
        if gate is None:
            return np.ones(len(prompts), dtype=bool)
        states = engine.capture(prompts, [gate.layer], site=GATE_SITE)[:, 0]
        return gate.opens(states)

    def gated_sums(self, engine: Engine, prompts: Sequence[str]) -> dict[int, dict[int, np.ndarray]]:
        """Return prompt index -> layer -> the summed gated vectors whose gate opened on that prompt."""
        per_key: dict[int, dict[int, np.ndarray]] = {}
        for slot in self.vectors:
            if slot.vector.gate is None or slot.strength == 0:
                continue
            vecs = self.vector_sum(engine.n_layer, [slot])
            for key in np.flatnonzero(self.gates(engine, prompts, slot)):
                mine = per_key.setdefault(int(key), {})
                for layer, v in vecs.items():
                    mine[layer] = mine[layer] + v if layer in mine else v
        # float32, as the edit adds it to float32 rows (what ggml_add does for a control vector)
        return {k: {L: np.asarray(v, dtype=np.float32) for L, v in vs.items()} for k, vs in per_key.items()}

    @contextmanager
    def applied(self, engine: Engine, prompts: Sequence[str]) -> Iterator[None]:
        """Steer ``engine`` for generating from ``prompts`` inside this block (nothing when off)."""
        with ExitStack() as stack:
            if self.active:
                # Plans read the UNSTEERED model: they are made before any steering is switched on.
                by_site: dict[str, list[tuple[float, list[EditPlan]]]] = {}
                for slot in self.profiles:
                    if slot.strength != 0:
                        by_site.setdefault(slot.profile.site, []).append((slot.strength, self.plans(engine, prompts, slot)))
                gated = self.gated_sums(engine, prompts)
                vecs = self.vector_sum(engine.n_layer, [v for v in self.vectors if v.vector.gate is None])
                if vecs:
                    stack.enter_context(engine.control_vector(vecs))
                layers = sorted({L for vs in gated.values() for L in vs})
                if layers:
                    stack.enter_context(engine.activation_edit(vector_edit(gated), layers, site=GATE_SITE, all_tokens=True))
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
    ) -> list[Completion]:
        """Return completions for ``prompts`` under this steering."""
        with self.applied(engine, prompts):
            return engine.generate(prompts, sampling, on_token=on_token)


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


def vector_edit(per_key: Mapping[int, Mapping[int, np.ndarray]]) -> EditFn:
    """Return an edit adding each key's summed vector at a layer to that key's rows only."""

    def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray | None:
        touched = False
        for row, key in enumerate(keys):
            v = per_key.get(key, {}).get(layer)
            if v is not None:
                x[row] += v  # float32 + float32, exactly what ggml_add does for a control vector
                touched = True
        return x if touched else None

    return edit


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


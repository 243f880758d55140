"""Apply steering to an engine: control vectors (constant, additive) and profiles (the exact,
input-dependent AlignEZ edit), each with its own strength or weight, live-adjustable.

The exact edit needs to know the prompt before it edits: for every prompt, a planning pass reads
the profile's site at the last prompt token (``Engine.capture``), ``plan_edit`` keeps the
directions the prompt does not already carry and picks the top-n layers, and then generation runs
with an eval-callback edit that applies the rule to the last prompt token and to every generated
token, per sequence. Several profiles are combined as a weighted sum of their deltas, each computed
from the same unedited activation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignez_local.formats.control_vector import ControlVector, read_control_vector
from alignez_local.align.edit import EditPlan, edit_delta, plan_edit
from alignez_local.llama.engine import Completion, Engine, Sampling, TokenFn
from alignez_local.errors import AlignezError
from alignez_local.formats.profile import SteeringProfile, load_profile

DEFAULT_TOP_N = 5


def parse_weighted(spec: str, what: str) -> tuple[str, float]:
    """Return (path, number) from ``FILE[:NUMBER]`` (number 1.0 when absent)."""
    path, sep, num = spec.rpartition(":")
    if not sep or not num or os.path.exists(spec):
        return spec, 1.0
    try:
        value = float(num)
    except ValueError:
        return spec, 1.0  # a path that contains a colon
    if not np.isfinite(value) or abs(value) > 100:
        raise AlignezError(f"{what} {value} in {spec!r} is out of range; use a number between -100 and 100")
    return path, value


def parse_layer_range(spec: str | None, n_layer: int | None = None) -> tuple[int, int] | None:
    """Return (first, last) inclusive from ``A-B`` (or a single ``A``); None for no limit."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    a, sep, b = spec.strip().partition("-")
    try:
        lo, hi = int(a), int(b) if sep else int(a)
    except ValueError:
        raise AlignezError(f"layer range {spec!r} is not A-B; write it like 8-20") from None
    if lo < 0 or hi < lo:
        raise AlignezError(f"layer range {spec!r} is empty or negative; write it like 8-20 with A <= B")
    if n_layer is not None and hi >= n_layer:
        raise AlignezError(f"layer range {spec!r} goes past the model's last layer {n_layer - 1}")
    return lo, hi


@dataclass
class VectorSlot:
    name: str
    vector: ControlVector
    strength: float = 1.0


@dataclass
class ProfileSlot:
    name: str
    profile: SteeringProfile
    weight: float = 1.0


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
        vectors: Sequence[str] = (),
        profiles: Sequence[str] = (),
        layers: str | None = None,
        top_n: int = DEFAULT_TOP_N,
    ) -> "Steering":
        """Return steering built from ``FILE[:STRENGTH]`` / ``FILE[:WEIGHT]`` specs, checked against the model."""
        if top_n < 1:
            raise AlignezError(f"--top-n {top_n} is out of range; use 1 or more")
        # More layers than the model has simply means every candidate layer.
        st = cls(layer_range=parse_layer_range(layers, engine.n_layer), top_n=min(top_n, engine.n_layer))
        used: set[str] = set()
        for spec in vectors:
            path, strength = parse_weighted(spec, "strength")
            cv = read_control_vector(path)
            st.warnings += cv.check_compatible(engine.n_layer, engine.n_embd, engine.arch)
            st.vectors.append(VectorSlot(_unique(Path(path).stem, used), cv, strength))
        for spec in profiles:
            path, weight = parse_weighted(spec, "weight")
            prof = load_profile(path)
            st.warnings += prof.check_compatible(engine.n_layer, engine.n_embd, engine.arch)
            st.profiles.append(ProfileSlot(_unique(Path(path).stem, used), prof, weight))
        return st

    @property
    def active(self) -> bool:
        """True when something would change the model's output."""
        return self.enabled and (
            any(v.strength != 0 for v in self.vectors) or any(p.weight != 0 for p in self.profiles)
        )

    def _in_range(self, layer: int) -> bool:
        r = self.layer_range
        return r is None or r[0] <= layer <= r[1]

    def vector_sum(self, n_layer: int) -> dict[int, np.ndarray]:
        """Return layer -> the sum of strength x direction over all vectors, inside the layer range."""
        total: dict[int, np.ndarray] = {}
        for slot in self.vectors:
            for layer, d in slot.vector.directions.items():
                if self._in_range(layer) and 1 <= layer < n_layer and slot.strength != 0:
                    total[layer] = total.get(layer, 0) + slot.strength * d
        return total

    def describe(self) -> list[str]:
        """Return one line per active vector/profile (what, strength, layers) for display."""
        lines = []
        for v in self.vectors:
            lines.append(f"vector  {v.name}: strength {v.strength:g}, layers {_span(v.vector.layers)}")
        for p in self.profiles:
            lines.append(
                f"profile {p.name}: weight {p.weight:g}, {p.profile.method} on {p.profile.site}, "
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

    @contextmanager
    def applied(self, engine: Engine, prompts: Sequence[str]) -> Iterator[None]:
        """Steer ``engine`` for generating from ``prompts`` inside this block (nothing when off)."""
        with ExitStack() as stack:
            if self.active:
                # Plans read the UNSTEERED model: they are made before any steering is switched on.
                by_site: dict[str, list[tuple[float, list[EditPlan]]]] = {}
                for slot in self.profiles:
                    if slot.weight != 0:
                        by_site.setdefault(slot.profile.site, []).append((slot.weight, self.plans(engine, prompts, slot)))
                vecs = self.vector_sum(engine.n_layer)
                if vecs:
                    stack.enter_context(engine.control_vector(vecs))
                for site, weighted in by_site.items():
                    layers = sorted({L for _, plans in weighted for p in plans for L in p.directions})
                    if layers:
                        stack.enter_context(engine.activation_edit(_profile_edit(weighted), layers, site=site))
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


def _profile_edit(weighted: list[tuple[float, list[EditPlan]]]):
    """Return the eval-callback edit applying every profile's per-prompt plan, weighted."""

    def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray | None:
        delta = np.zeros_like(x)
        touched = False
        for weight, plans in weighted:
            for row, key in enumerate(keys):
                dirs = plans[key].directions.get(layer)
                if dirs is not None:
                    delta[row] += weight * edit_delta(x[row], dirs)
                    touched = True
        return x + delta if touched else None

    return edit


def _unique(name: str, used: set[str]) -> str:
    base, n = name, 2
    while name in used:
        name = f"{base}-{n}"
        n += 1
    used.add(name)
    return name


def _span(layers: Sequence[int]) -> str:
    return f"{min(layers)}-{max(layers)} ({len(layers)})" if layers else "none"


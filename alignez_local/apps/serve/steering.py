"""The vectors and profiles a server has loaded, and per-request steering inside one decode batch.

Every request in a batch is one sequence of ``Engine.generate``; the engine's edit callback sees
which sequence (``key`` = the request's index in the batch) each row belongs to. So:

- a control vector becomes an ``all_tokens`` edit on ``l_out`` that adds strength x direction to
  the rows of the requests that asked for it (what llama.cpp's control vector does, per sequence);
- a profile becomes the exact AlignEZ edit on its site with a plan per request, made from an
  unsteered capture of that request's prompt, as ``Steering.applied`` does for one user.

The arithmetic is ``align/steering.py``'s (``Steering.vector_sum``, ``Steering.plans``,
``profile_edit``), reused, so a request steered alone gets the tokens ``alignez chat`` gives.
Rows of requests that chose nothing are written back unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.align.edit import EditPlan
from alignez_local.align.steering import DEFAULT_TOP_N, ProfileSlot, Steering, VectorSlot, profile_edit
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import ControlVector, read_control_vector
from alignez_local.formats.profile import SteeringProfile, load_profile
from alignez_local.llama.engine import EditFn, Engine
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

    def describe(self) -> dict[str, Any]:
        """Return the JSON description ``GET /v1/steering`` shows."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "path": self.path,
            "layers": self.layers, "default_strength": self.default_strength,
        }
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
                raise AlignezError(f"unknown steering name {name!r}; loaded: {known}")
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
                raise AlignezError(f"steering strength for {name!r} must be a number, got {strength!r}")
            check_strength(float(strength), f"steering strength for {name!r}")
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
        per_key: dict[int, dict[int, np.ndarray]] = {}
        for key, choice in enumerate(choices):
            slots = [VectorSlot(n, self.items[n].item, w) for n, w in choice.items() if self.items[n].kind == "vector"]
            if slots:
                per_key[key] = Steering(vectors=slots).vector_sum(self.n_layer)  # type: ignore[arg-type]
        layers = sorted({layer for vecs in per_key.values() for layer in vecs})
        if layers:
            edits.append(BatchEdit(_vector_edit(per_key), layers, "l_out", True))
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


def _vector_edit(per_key: Mapping[int, Mapping[int, np.ndarray]]) -> EditFn:
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

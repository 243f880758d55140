"""A control vector's gates: when the vector applies. Read by our runtime (``align/steering.py``, the
server); llama.cpp ignores them and steers every prompt.

A ``Gate`` is one condition: a prompt's unsteered state at ``l_out-layer`` (its last token),
projected onto a direction, compared with a threshold. ``Gates`` is what a file holds: one or more
gates and the rule combining them, ``any`` (the vector applies when one gate opens) or ``all``
(when every gate opens), as IBM CAST's ``multisteer`` rules combine conditions.

Stored as the JSON string ``alignez.gate``, in one of two forms:

- one gate comparing with ``>`` (every file written before several gates existed, and what we
  still write for such a gate, so that older alignez-local keeps reading it):
  ``{"site": "l_out", "layer": 10, "threshold": -0.43, "direction": [...]}``
- anything else (several gates, or another comparison), form ``2``:
  ``{"format": 2, "rule": "any", "gates": [{"site", "layer", "threshold", "comparison",
  "direction"}, ...], "layer": "<a sentence>", "direction": []}``.

An older reader must refuse form 2, not misread it. Every alignez-local that reads one gate builds
a ``Gate`` from the top level of ``alignez.gate``: a dict whose ``direction`` is a list of numbers,
then the layer, which must be an integer. Form 2's top-level ``layer`` is therefore a sentence
("this file holds 2 gates combined by any; ... upgrade alignez-local") and its ``direction`` an empty
list, so an older reader stops with one line quoting that sentence. The key stays ``alignez.gate``
on purpose: an older reader keeps any other ``alignez.*`` key as plain metadata, so a new key alone
would load as an UNGATED vector and steer every prompt. A reader of this version refuses a form it
does not know (``format`` above 2) the same way, with one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.formats.steering_file import MAX_LAYER, MAX_N_EMBD, finite_scalar, is_int, is_number

KEY_GATE = "alignez.gate"

# Gate sites: where the gate reads a prompt's state. Only the layer output, the node llama.cpp
# adds control vectors to, so a gate and its vector live in the same place.
GATE_SITE = "l_out"

COMPARISONS = (">", ">=", "<", "<=")
RULES = ("any", "all")
GATES_FORMAT = 2  # the newest form of alignez.gate this version reads and writes
MAX_GATES = 16  # far above any rule we choose (2-3), but bounded: a forged file cannot make us loop


@dataclass(frozen=True, eq=False)
class Gate:
    """One condition: the prompt's state at ``l_out-layer`` (the last prompt token, unsteered)
    projected onto ``direction``, compared with ``threshold`` by ``comparison``.

    ``direction`` is a float32 (n_embd,) array (unit, as we fit it). ``comparison`` is one of
    ``COMPARISONS``; ``>`` (the default, and the only one before several gates) opens on
    ``x @ direction > threshold``.
    """

    layer: int
    direction: np.ndarray
    threshold: float
    comparison: str = ">"

    def __post_init__(self) -> None:
        # The layer is checked first: an older reader meeting a form-2 file stops here (module docstring).
        if not is_int(self.layer) or not 0 <= int(self.layer) <= MAX_LAYER:
            raise AlignezError(f"a gate's layer must be an integer in 0..{MAX_LAYER}, got {self.layer!r}")
        arr = np.array(self.direction, dtype=np.float32)
        if arr.ndim != 1 or not 1 <= arr.size <= MAX_N_EMBD or not np.all(np.isfinite(arr)):
            raise AlignezError(f"a gate's direction must be 1-D with 1..{MAX_N_EMBD} finite values")
        if not np.any(arr):
            raise AlignezError("a gate's direction is zero; it cannot tell prompts apart")
        if self.comparison not in COMPARISONS:
            raise AlignezError(f"a gate's comparison must be one of {' '.join(COMPARISONS)}, got {self.comparison!r}")
        arr.setflags(write=False)
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "direction", arr)
        object.__setattr__(self, "threshold", finite_scalar(self.threshold, "a gate's threshold"))

    def project(self, states: np.ndarray) -> np.ndarray:
        """Return the projection (float64) of each row of ``states`` (n, n_embd) onto the direction."""
        return np.atleast_2d(np.asarray(states, dtype=np.float64)) @ self.direction.astype(np.float64)

    def passes(self, proj: np.ndarray) -> np.ndarray:
        """Return, per projection, whether it passes this gate's comparison with its threshold."""
        t = self.threshold
        c = self.comparison
        return proj > t if c == ">" else proj >= t if c == ">=" else proj < t if c == "<" else proj <= t

    def opens(self, states: np.ndarray) -> np.ndarray:
        """Return one bool per row of ``states`` (n, n_embd): True where this gate opens."""
        return self.passes(self.project(states))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gate):
            return NotImplemented
        return ((self.layer, self.threshold, self.comparison) == (other.layer, other.threshold, other.comparison)
                and np.array_equal(self.direction, other.direction))

    __hash__ = None  # type: ignore[assignment]

    def as_json(self) -> dict[str, Any]:
        """Return the gate as JSON (the comparison only when it is not the original ``>``)."""
        out: dict[str, Any] = {"site": GATE_SITE, "layer": self.layer, "threshold": self.threshold}
        if self.comparison != ">":
            out["comparison"] = self.comparison
        return {**out, "direction": [float(v) for v in self.direction]}

    def describe(self) -> dict[str, Any]:
        """Return what ``inspect`` shows of the gate (not the direction)."""
        return {"site": GATE_SITE, "layer": self.layer, "comparison": self.comparison, "threshold": round(self.threshold, 4)}

    @classmethod
    def from_dict(cls, d: object, where: str) -> "Gate":
        """Return the gate a parsed JSON object describes, or raise AlignezError (the file is damaged)."""
        if not isinstance(d, dict) or d.get("site", GATE_SITE) != GATE_SITE or not isinstance(d.get("direction"), list) \
                or not all(is_number(v) for v in d["direction"]) or not isinstance(d.get("comparison", ">"), str):
            raise AlignezError(f"{where}: {KEY_GATE} holds a gate that is not (site, layer, threshold, direction); the file is damaged")
        return cls(d.get("layer"), np.array(d["direction"], dtype=np.float32), d.get("threshold"),  # type: ignore[arg-type]
                   d.get("comparison", ">"))


@dataclass(frozen=True, eq=False)
class Gates:
    """The gates of a vector and the rule combining them: ``any`` opens when one gate opens, ``all``
    when every gate does. One gate reads the same under either rule."""

    gates: tuple[Gate, ...]
    rule: str = "any"

    def __post_init__(self) -> None:
        gates = (self.gates,) if isinstance(self.gates, Gate) else tuple(self.gates) if isinstance(self.gates, (list, tuple)) else ()
        if not 1 <= len(gates) <= MAX_GATES or not all(isinstance(g, Gate) for g in gates):
            raise AlignezError(f"a vector's gates must be a Gate or a list of 1..{MAX_GATES} of them, got {type(self.gates).__name__}"
                               + (f" of {len(gates)}" if gates else ""))
        if len({g.direction.size for g in gates}) != 1:
            raise AlignezError("a vector's gates must all have the same width")
        if self.rule not in RULES:
            raise AlignezError(f"a gate rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        object.__setattr__(self, "gates", gates)

    @classmethod
    def of(cls, gate: "Gate | Gates | Sequence[Gate]", rule: str = "any") -> "Gates":
        """Return ``gate`` as Gates: a lone Gate or a list of them (with ``rule``), or Gates as it is."""
        return gate if isinstance(gate, Gates) else cls(gate, rule)  # type: ignore[arg-type]  # __post_init__ wraps a lone Gate

    def __iter__(self) -> Iterator[Gate]:
        return iter(self.gates)

    def __len__(self) -> int:
        return len(self.gates)

    @property
    def width(self) -> int:
        return int(self.gates[0].direction.size)

    @property
    def layers(self) -> list[int]:
        """Return the layers the gates read, ascending, each once."""
        return sorted({g.layer for g in self.gates})

    def combine(self, passed: np.ndarray) -> np.ndarray:
        """Return the rule applied to ``passed`` (gates x n bools): one decision per prompt."""
        return passed.any(axis=0) if self.rule == "any" else passed.all(axis=0)

    def opens(self, states: Mapping[int, np.ndarray]) -> np.ndarray:
        """Return one bool per prompt: do the gates open, reading ``states[layer]`` (n, n_embd) at each gate's layer?"""
        return self.combine(np.stack([g.opens(states[g.layer]) for g in self.gates]))

    def decide(self, states: Mapping[int, np.ndarray], margin: Mapping[int, np.ndarray],
               rescale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Return (opens, sure), one bool each per prompt, from states known only to within
        ``margin[layer]`` (n,) along any unit direction, give or take a rescaling of up to
        ``rescale``: a projection within ``margin x |direction| + rescale x |projection|`` of its
        threshold may go either way, and ``sure`` is False where the rule's outcome depends on one.
        (Three-valued: ``any`` is surely open when one gate surely opens, surely shut when every
        gate surely stays shut; ``all`` the other way round.) ``opens`` is ``opens(states)``: where
        ``sure``, what any states within the margin would give."""
        passed, certain = [], []
        for g in self.gates:
            proj = g.project(states[g.layer])
            passed.append(g.passes(proj))
            width = margin[g.layer] * float(np.linalg.norm(g.direction.astype(np.float64))) + rescale * np.abs(proj)
            certain.append(np.abs(proj - g.threshold) > width)
        p, c = np.stack(passed), np.stack(certain)
        sure_open, sure_shut = p & c, ~p & c
        if self.rule == "any":
            sure = sure_open.any(axis=0) | sure_shut.all(axis=0)
        else:
            sure = sure_open.all(axis=0) | sure_shut.any(axis=0)
        return self.combine(p), sure

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gates):
            return NotImplemented
        return self.rule == other.rule and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    @property
    def one_gate_form(self) -> bool:
        """True when the gates fit the original one-gate form (older alignez-local reads them)."""
        return len(self.gates) == 1 and self.gates[0].comparison == ">"

    def as_json(self) -> dict[str, Any]:
        """Return ``alignez.gate``'s JSON: the original one-gate form when it fits, else form 2."""
        if self.one_gate_form:
            return self.gates[0].as_json()
        why = (f"this file holds {len(self.gates)} gate{'s' if len(self.gates) > 1 else ''} combined by "
               f"{self.rule!r} (alignez.gate format {GATES_FORMAT}), which this alignez-local cannot read; upgrade alignez-local")
        return {"format": GATES_FORMAT, "rule": self.rule,
                "gates": [{**g.as_json(), "comparison": g.comparison} for g in self.gates],
                "layer": why, "direction": []}

    def describe(self) -> dict[str, Any]:
        """Return what ``inspect`` shows: the rule and each gate (not the directions)."""
        return {"rule": self.rule, "gates": [g.describe() for g in self.gates]}

    def summary(self) -> str:
        """Return the gates in a few words: ``layer 10`` or ``any of layers 8 (>), 11 (>)``."""
        if len(self.gates) == 1:
            g = self.gates[0]
            return f"layer {g.layer}" + ("" if g.comparison == ">" else f" ({g.comparison})")
        return f"{self.rule} of layers " + ", ".join(f"{g.layer} ({g.comparison})" for g in self.gates)

    @classmethod
    def from_json(cls, raw: object, where: str) -> "Gates":
        """Return the gates stored as JSON text in a file (either form), or raise AlignezError."""
        try:
            d = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            d = None
        if not isinstance(d, dict):
            raise AlignezError(f"{where}: {KEY_GATE} is not a gate (site, layer, threshold, direction); the file is damaged")
        if "format" not in d:
            return cls((Gate.from_dict(d, where),))
        form = d["format"]
        if is_int(form) and form > GATES_FORMAT:
            raise AlignezError(f"{where}: {KEY_GATE} is format {form}, newer than this alignez-local reads "
                               f"(up to {GATES_FORMAT}); upgrade alignez-local")
        gates = d.get("gates")
        if form != GATES_FORMAT or not isinstance(gates, list) or not 1 <= len(gates) <= MAX_GATES \
                or d.get("rule") not in RULES:
            raise AlignezError(f"{where}: {KEY_GATE} is not a list of 1..{MAX_GATES} gates with a rule "
                               f"({' or '.join(RULES)}); the file is damaged")
        return cls(tuple(Gate.from_dict(g, where) for g in gates), d["rule"])

"""The one-gate reader every alignez-local shipped before several gates existed (issue 29), frozen.

Copied verbatim from ``alignez_local/formats/gate.py`` at commit b3b5ad4 (the reader is the same
since gates were added in f25788f): ``read_control_vector`` handed ``alignez.gate`` to
``Gate.from_json``, so this is all of what an older alignez-local does with a file's gate. The tests
feed it the files this version writes, to check that an older reader loads a one-gate file as before
and refuses a file with several gates with one clear line (tests/test_gate.py). Never import it
from the package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.formats.steering_file import MAX_LAYER, MAX_N_EMBD, finite_scalar, is_int, is_number

KEY_GATE = "alignez.gate"

# Gate sites: where the gate reads a prompt's state. Only the layer output, the node llama.cpp
# adds control vectors to, so a gate and its vector live in the same place.
GATE_SITE = "l_out"


@dataclass(frozen=True, eq=False)
class Gate:
    """When a vector applies: to prompts whose state at ``l_out-layer`` (the last prompt token,
    unsteered) projects onto ``direction`` above ``threshold``.

    ``direction`` is a unit float32 (n_embd,) array. The rule is linear: ``x @ direction > threshold``.
    """

    layer: int
    direction: np.ndarray
    threshold: float

    def __post_init__(self) -> None:
        if not is_int(self.layer) or not 0 <= int(self.layer) <= MAX_LAYER:
            raise AlignezError(f"a gate's layer must be an integer in 0..{MAX_LAYER}, got {self.layer!r}")
        arr = np.array(self.direction, dtype=np.float32)
        if arr.ndim != 1 or not 1 <= arr.size <= MAX_N_EMBD or not np.all(np.isfinite(arr)):
            raise AlignezError(f"a gate's direction must be 1-D with 1..{MAX_N_EMBD} finite values")
        if not np.any(arr):
            raise AlignezError("a gate's direction is zero; it cannot tell prompts apart")
        arr.setflags(write=False)
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "direction", arr)
        object.__setattr__(self, "threshold", finite_scalar(self.threshold, "a gate's threshold"))

    def opens(self, states: np.ndarray) -> np.ndarray:
        """Return one bool per row of ``states`` (n, n_embd): True where the gate lets the vector act."""
        proj = np.atleast_2d(np.asarray(states, dtype=np.float64)) @ self.direction.astype(np.float64)
        return proj > self.threshold

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gate):
            return NotImplemented
        return (self.layer, self.threshold) == (other.layer, other.threshold) and np.array_equal(self.direction, other.direction)

    __hash__ = None  # type: ignore[assignment]

    def as_json(self) -> dict[str, Any]:
        return {"site": GATE_SITE, "layer": self.layer, "threshold": self.threshold,
                "direction": [float(v) for v in self.direction]}

    @classmethod
    def from_json(cls, raw: object, where: str) -> "Gate":
        """Return the gate stored as JSON text in a file, or raise AlignezError (the file is damaged)."""
        try:
            d = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            d = None
        if not isinstance(d, dict) or d.get("site", GATE_SITE) != GATE_SITE or not isinstance(d.get("direction"), list) \
                or not all(is_number(v) for v in d["direction"]):
            raise AlignezError(f"{where}: {KEY_GATE} is not a gate (site, layer, threshold, direction); the file is damaged")
        return cls(d.get("layer"), np.array(d["direction"], dtype=np.float32), d.get("threshold"))  # type: ignore[arg-type]

"""Names and small parsers every stage shares, defined once.

- the capture sites (llama.cpp graph node names the toolkit reads and edits);
- the strength limit and the ``FILE[:STRENGTH]`` steering spec, for vectors and profiles alike;
- layer ranges (``A-B``) and layer lists (``A-B,C``).

Parsers raise AlignezError with a message about the value, not about a CLI flag: the caller
knows which flag or request field the value came from and adds that.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from alignez_local.errors import AlignezError

# Graph nodes the engine can capture and edit. ``ffn_out`` is the paper's embedding (the MLP
# output); ``l_out`` is the residual stream that llama.cpp control vectors are added to.
CAPTURE_SITES = ("ffn_out", "l_out", "attn_out")
# Sites a steering profile can be fitted on (attn_out is capturable but not a documented choice).
FIT_SITES = ("ffn_out", "l_out")

# Beyond |100| every model tried here produced nothing but gibberish; a larger number is a typo.
MAX_STRENGTH = 100.0


def check_strength(value: float, source: str = "strength") -> float:
    """Return ``value`` if it is a usable strength, else raise AlignezError naming ``source``."""
    if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
        raise AlignezError(f"{source} {value:g} is out of range; use a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}")
    return float(value)


def parse_strength(text: str, source: str = "strength") -> float:
    """Return ``text`` as a strength, or raise AlignezError saying what is accepted."""
    try:
        value = float(text)
    except ValueError:
        raise AlignezError(f"{source} {text!r} is not a number; write it like 0.5 or -1.5") from None
    return check_strength(value, source)


def parse_strengths(text: str, source: str, positive: bool = False, limit: float = MAX_STRENGTH,
                    most: int = 16) -> tuple[float, ...]:
    """Return the strengths of a comma-separated list like ``0,0.5,1,2`` (duplicates dropped, order
    kept): 1 to ``most`` numbers, each within +-``limit`` and above 0 when ``positive``. The one
    parser of a strength list (``steer --strengths``, ``eval --sweep``); ``source`` names the flag."""
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise AlignezError(f"{source} {text!r}: {part!r} is not a number; write the list like 0.25,0.5,1") from None
        if not math.isfinite(value) or abs(value) > limit or (positive and value <= 0):
            span = f"above 0 and up to {limit:g}" if positive else f"between -{limit:g} and {limit:g}"
            raise AlignezError(f"{source} {text!r}: {part} is out of range; give strengths {span}")
        if value not in out:
            out.append(value)
    if not out or len(out) > most:
        raise AlignezError(f"{source} {text!r}: give 1 to {most} strengths, e.g. 0.25,0.5,1")
    return tuple(out)


@dataclass(frozen=True)
class SteeringSpec:
    """A vector or profile file and the strength to apply it with.

    ``strength`` None means "not given": the file's own default (its calibrated strength when it
    has one, else 1) applies.
    """

    path: str
    strength: float | None = None

    def resolved(self, default: float = 1.0) -> float:
        """Return the strength to use, ``default`` (the file's own) when none was given."""
        return default if self.strength is None else self.strength


def parse_steering_spec(spec: str) -> SteeringSpec:
    """Return the spec of ``FILE[:STRENGTH]``; a path that exists as written wins over the colon."""
    path, sep, num = spec.rpartition(":")
    if not sep or not num or os.path.exists(spec):
        return SteeringSpec(spec)
    try:
        value = float(num)
    except ValueError:
        return SteeringSpec(spec)  # a path that contains a colon
    return SteeringSpec(path, check_strength(value, f"strength in {spec!r}"))


def parse_layer_range(spec: str | None, n_layer: int | None = None) -> tuple[int, int] | None:
    """Return (first, last) inclusive from ``A-B`` (or a single ``A``); None for ``all``/empty."""
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


def parse_layer_list(spec: str | None, n_layer: int) -> list[int] | None:
    """Return sorted layers from ``A-B`` or ``1,4,7`` or a mix; None for ``auto``/empty.

    Layer 0 is refused: llama.cpp control vectors have no slot for it.
    """
    if spec is None or spec.strip() in ("", "auto"):
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        rng = parse_layer_range(part) if part.strip() not in ("", "all") else None
        if rng is None:
            raise AlignezError(f"layers {spec!r} is not a list like 8-20 or 4,8,12")
        layers.update(range(rng[0], rng[1] + 1))
    bad = [x for x in layers if not 1 <= x < n_layer]
    if bad:
        raise AlignezError(f"layers {spec!r} names layers outside 1..{n_layer - 1} (layer 0 cannot be a control vector)")
    return sorted(layers)

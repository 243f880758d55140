"""What control vectors and steering profiles share: limits, value checks, equality, repr, and the
calibrated default strength.

Both file types carry two optional keys of their own (llama.cpp ignores unknown keys, so a control
vector with them still loads in llama.cpp):
- ``alignez.default_strength`` (F32): the strength calibration chose; None (key absent) means not
  calibrated, and users then get 1.0;
- ``alignez.calibration`` (JSON string): how that strength was chosen (strengths tried, KL,
  perplexity ratio...), free-form but JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
from gguf import GGUFValueType

from alignez_local.errors import AlignezError
from alignez_local.formats.gguf_file import GGUFContents, read_gguf
from alignez_local.formats.kinds import GGUFKind, require_kind
from alignez_local.specs import check_strength

# Far above any real model (the widest today is 16384, the deepest ~130 layers) but bounded, so a
# forged file cannot make us allocate without limit.
MAX_N_EMBD = 65536
MAX_LAYER = 4096

KEY_DEFAULT_STRENGTH = "alignez.default_strength"
KEY_CALIBRATION = "alignez.calibration"
RESERVED_KEYS = (KEY_DEFAULT_STRENGTH, KEY_CALIBRATION)

T = TypeVar("T")


def is_int(x: object) -> bool:
    """Return True for a Python or numpy integer that is not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x: object) -> bool:
    """Return True for a real (non-bool) Python or numpy number."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def finite_scalar(x: object, what: str) -> float:
    """Return ``x`` as a finite float, or raise AlignezError naming ``what``."""
    try:
        value = float(x) if is_number(x) else math.nan  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise AlignezError(f"{what} must be a finite number, got {x!r}")
    return value


def json_default(obj: Any) -> Any:
    """Return a JSON-encodable stand-in for mappings and numpy values; raise TypeError otherwise."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def freeze_json(value: Mapping[str, Any], what: str, where: str) -> Mapping[str, Any]:
    """Return a read-only copy of a JSON-serializable mapping, or raise AlignezError."""
    if not isinstance(value, Mapping):
        raise AlignezError(f"{where}: {what} must be a mapping, got {type(value).__name__}")
    try:
        json.dumps(value, default=json_default)
    except (TypeError, ValueError, RecursionError) as err:
        raise AlignezError(f"{where}: {what} cannot be saved as JSON ({err})") from None
    for k in value:
        if not isinstance(k, str):
            raise AlignezError(f"{where}: {what} key {k!r} is not a string")
    return MappingProxyType(dict(value))


def layer_array(key: object, value: object, where: str, noun: str) -> tuple[int, np.ndarray]:
    """Return (layer, float32 copy) of one per-layer array after the checks both file types need.

    ``noun`` names the array in messages ("layer" for a direction, "subspace" for a profile's).
    The shape is the caller's to check; values must be finite.
    """
    if not is_int(key):
        raise AlignezError(f"{where}: layer key {key!r} is not an integer")
    layer = int(key)  # type: ignore[call-overload]
    if not 0 <= layer <= MAX_LAYER:
        raise AlignezError(f"{where}: layer {layer} is outside 0..{MAX_LAYER}")
    try:
        # Values beyond float32 become inf here and are refused as non-finite below.
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.array(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise AlignezError(f"{where}: {noun} {layer} is not numeric") from None
    if arr.size and not np.all(np.isfinite(arr)):
        raise AlignezError(
            f"{where}: {noun} {layer} contains NaN or infinite values (a strength too large, or a damaged file)"
        )
    return layer, arr


def check_default_strength(value: object, where: str) -> float | None:
    """Return ``value`` as the float32-exact strength the file will hold, None for "not calibrated"."""
    if value is None:
        return None
    if not is_number(value):
        raise AlignezError(f"{where}: default_strength must be a number or None, got {value!r}")
    # Stored as F32: round now, so that what is saved reads back equal to what was made.
    with np.errstate(over="ignore"):
        rounded = float(np.float32(float(value)))  # type: ignore[arg-type]
    return check_strength(rounded, f"{where}: default_strength")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class SteeringFile:
    """Base of ControlVector and SteeringProfile: per-layer arrays plus the calibration fields.

    Subclasses name their arrays (``_ARRAYS``), validate them in ``__post_init__`` and call
    ``_check_calibration``; equality compares the arrays exactly and ``_eq_fields()`` by value.
    """

    default_strength: float | None = None
    calibration: Mapping[str, Any] | None = None

    _ARRAYS: ClassVar[str] = ""

    @property
    def _arrays(self) -> Mapping[int, np.ndarray]:
        return getattr(self, self._ARRAYS)  # type: ignore[no-any-return]

    @property
    def n_embd(self) -> int:
        """Return the model width every array lives in (the last axis)."""
        return int(next(iter(self._arrays.values())).shape[-1])

    @property
    def layers(self) -> list[int]:
        """Return the layers that have an array, ascending."""
        return sorted(self._arrays)

    @property
    def default_strength_or_one(self) -> float:
        """Return the strength to use when the user gives none: the calibrated one, else 1.0."""
        return 1.0 if self.default_strength is None else self.default_strength

    def calibration_warning(self) -> str | None:
        """Return a warning when the file's behaviour calibration found that no strength beat a random
        direction of the same norm (align/strength_by_behaviour.py), else None."""
        cal = self.calibration or {}
        if cal.get("rule") == "behaviour" and cal.get("beats_random") is False:
            return (f"its calibration found that {cal.get('verdict', 'no strength beat a random direction')} "
                    f"(strength {cal.get('strength')} was the best tried): expect no reliable effect")
        return None

    def _check_calibration(self, where: str) -> None:
        """Store the validated, read-only default_strength and calibration (frozen, so via object)."""
        object.__setattr__(self, "default_strength", check_default_strength(self.default_strength, where))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", freeze_json(self.calibration, "calibration", where))

    def _eq_fields(self) -> dict[str, Any]:
        """Return the non-array fields equality compares (subclasses add theirs)."""
        calib = None if self.calibration is None else dict(self.calibration)
        return {"default_strength": self.default_strength, "calibration": calib}

    def __eq__(self, other: object) -> bool:
        """Return True when both are the same type with equal arrays (exactly) and equal fields."""
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, SteeringFile)
        return (
            self.layers == other.layers
            and all(np.array_equal(self._arrays[k], other._arrays[k]) for k in self.layers)
            and self._eq_fields() == other._eq_fields()
        )

    __hash__ = None  # type: ignore[assignment]  # equality is by array values, so no hash

    def _repr_fields(self) -> dict[str, Any]:
        """Return the fields the repr shows (subclasses give theirs; never the arrays)."""
        return {}

    def __repr__(self) -> str:
        """Return a short description: the subclass's fields and the default strength."""
        fields = dict(self._repr_fields())
        fields["default_strength"] = None if self.default_strength is None else float(f"{self.default_strength:.6g}")
        inner = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"{type(self).__name__}({inner})"

    def describe(self) -> dict[str, Any]:
        """Return the facts ``inspect`` shows: the subclass's plus the calibration fields."""
        return {
            "default_strength": self.default_strength,
            "calibration": None if self.calibration is None else dict(self.calibration),
        }

    def calibration_kvs(self) -> list[tuple[str, GGUFValueType, Any]]:
        """Return the GGUF key/values that store default_strength and calibration (none when unset)."""
        kvs: list[tuple[str, GGUFValueType, Any]] = []
        if self.default_strength is not None:
            kvs.append((KEY_DEFAULT_STRENGTH, GGUFValueType.FLOAT32, self.default_strength))
        if self.calibration is not None:
            text = json.dumps(dict(self.calibration), default=json_default, ensure_ascii=False, sort_keys=True)
            kvs.append((KEY_CALIBRATION, GGUFValueType.STRING, text))
        return kvs


def read_calibration(contents: GGUFContents, where: str) -> dict[str, Any]:
    """Return ``default_strength`` and ``calibration`` keyword arguments read from a parsed file."""
    md, types = contents.metadata, contents.value_types
    strength = md.get(KEY_DEFAULT_STRENGTH)
    if strength is not None and not types[KEY_DEFAULT_STRENGTH].is_float:
        raise AlignezError(
            f"{where}: {KEY_DEFAULT_STRENGTH} is {types[KEY_DEFAULT_STRENGTH]}, not a float; the file is damaged"
        )
    calibration = None
    if KEY_CALIBRATION in md:
        raw = md[KEY_CALIBRATION]
        try:
            calibration = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            calibration = None
        if not isinstance(calibration, dict):
            raise AlignezError(f"{where}: {KEY_CALIBRATION} is not a JSON object string; the file is damaged")
    return {"default_strength": strength, "calibration": calibration}


def read_in_two_passes(
    path: str | os.PathLike[str], kind: GGUFKind, check: Callable[[GGUFContents], T], *, unknown_ok: bool = False
) -> tuple[GGUFContents, T]:
    """Return (contents with F32 data, ``check(contents)``) of a vector or profile file.

    Pass 1 reads the header only and runs the kind check and ``check`` on it, so a multi-GB model
    given by mistake is recognised without reading it, and the data to load is bounded before it
    is read. Pass 2 reads the data and checks again: the file may have been replaced in between.
    Every F32 tensor then carries its data.
    """
    what = f"a .gguf {'control vector' if kind == 'control-vector' else 'steering profile'}"
    head = read_gguf(path, want_data=False, want_arrays=False, what=what)
    require_kind(head, kind, unknown_ok=unknown_ok)
    check(head)
    contents = read_gguf(path, want_data=True, want_arrays=False, what=what)
    require_kind(contents, kind, unknown_ok=unknown_ok)
    checked = check(contents)
    for name, t in contents.tensors.items():
        if t.type_name == "F32" and t.data is None:  # guards a future change of read_gguf
            raise AlignezError(f"{contents.path}: tensor {name} has no data; download it again")
    return contents, checked

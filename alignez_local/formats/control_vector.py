"""ControlVector: one direction per layer, in the GGUF layout llama.cpp, cvector-generator and repeng share.

File layout (what llama.cpp's loader in common/common.cpp accepts, and what we write):
- tensors ``direction.N`` (N >= 1), F32, 1-D, all of length n_embd; ``direction.N`` is added to
  the OUTPUT of layer N (0-based), so layer 0 can never be steered and ``direction.0`` makes
  llama.cpp reject the whole file;
- ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model's
  architecture, e.g. "llama"), ``controlvector.layer_count`` (uint32). llama.cpp reads none of them;
- our own extra keys, all named ``alignez.*`` (llama.cpp ignores unknown keys). The model's
  layer count, when known, is stored as ``alignez.model.n_layer`` and is also what we write as
  ``controlvector.layer_count`` (cvector-generator writes the number of directions, repeng the
  number of layers it trained, so that key is never trusted on reading). ``alignez.default_strength``
  (F32) and ``alignez.calibration`` (JSON) hold the calibrated strength (see ``steering_file``);
  ``alignez.gate`` (JSON) holds optional ``Gates`` (one gate, or several with an any/all rule that
  older alignez-local refuses: ``formats/gate.py``); ``alignez.placement`` says which tokens our
  runtime adds the vector to (``PLACEMENTS``, or ``answer-after:N``; absent: every token, as llama.cpp
  does);
  ``alignez.form`` how (``FORMS``; absent: ``add``, llama.cpp's constant addition). A ``clamp`` vector
  raises each row's component along its direction to a target and never past it: the target is
  ``alignez.clamp_floor`` (JSON, layer -> the plain answers' mean component along the unit direction)
  plus strength x the direction's norm, so at any strength a row sitting at the plain mean moves
  exactly as far as the constant addition moves it, and a row already past the target is left alone.
  A ``keep-norm`` vector is added and each row is then scaled back to the length it had: the row
  turns toward the direction without growing (issue 31: the hidden state's norm kept).

A gated vector steers only the prompts its gates open on (our runtime decides per prompt, from the
prompt's own unsteered state). llama.cpp does not read the gates: there the vector steers every
prompt, as any control vector does. Likewise an ``answer-only`` vector: our runtime adds it to the
rows that write the answer only (``answer-after:N``: those rows after the answer's first N tokens),
llama.cpp to every token (the calibration record compares the two),
and a ``clamp`` or ``keep-norm`` vector, which llama.cpp adds as a constant.
"""

from __future__ import annotations

# size: the one owner of the control-vector file (llama.cpp's checks on reading, our optional keys:
# calibration, gates, placement, form) and of its arithmetic; splitting the keys from the reader would
# make two owners of what a valid file is.

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
from gguf import GGUFValueType

from alignez_local.errors import AlignezError
from alignez_local.specs import check_strength
from alignez_local.formats.gate import KEY_GATE, Gate, Gates
from alignez_local.formats.gguf_file import GGUFContents
from alignez_local.formats.gguf_write import write_gguf
from alignez_local.formats.kinds import CONTROL_VECTOR_ARCH, DIRECTION_RE
from alignez_local.formats.steering_file import (
    MAX_LAYER,
    MAX_N_EMBD,
    RESERVED_KEYS,
    SteeringFile,
    finite_scalar,
    is_number,
    layer_array,
    read_calibration,
    read_in_two_passes,
)

KEY_MODEL_HINT = "controlvector.model_hint"
KEY_LAYER_COUNT = "controlvector.layer_count"
META_PREFIX = "alignez."
META_N_LAYER = "alignez.model.n_layer"
KEY_PLACEMENT = "alignez.placement"
EVERY_TOKEN, ANSWER_ONLY = "every-token", "answer-only"
PLACEMENTS = (EVERY_TOKEN, ANSWER_ONLY)  # answer-only: the last prompt token and each generated token
# answer-after:N: the answer-only rows after the first N (the answer's first N tokens are written
# unsteered; issue 31: brief steered from its third token kept more answers than from its first).
ANSWER_AFTER, MAX_ONSET = "answer-after", 4096


def answer_after(n: int) -> str:
    """Return the placement that adds a vector to the answer's rows after its first ``n`` tokens."""
    return ANSWER_ONLY if n == 0 else f"{ANSWER_AFTER}:{n}"


def placement_onset(placement: str) -> int | None:
    """Return how many answer tokens a placement leaves unsteered: None for every-token (it steers the
    prompt too), 0 for answer-only, N for answer-after:N; raise for an unknown placement."""
    if placement == EVERY_TOKEN:
        return None
    if placement == ANSWER_ONLY:
        return 0
    head, sep, n = placement.partition(":")
    if head == ANSWER_AFTER and sep and n.isdigit() and n == str(int(n)) and 1 <= int(n) <= MAX_ONSET:
        return int(n)
    raise AlignezError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)} or "
                       f"{ANSWER_AFTER}:N (N from 1 to {MAX_ONSET}: the answer tokens written before the vector is on)")


def placement_words(placement: str) -> str:
    """Return which tokens a placement steers, in words ("every token", "the answer's tokens only", ...)."""
    n = placement_onset(placement)
    return ("every token" if n is None else "the answer's tokens only" if n == 0
            else f"the answer's tokens after its first {n}")


def is_placement(placement: object) -> bool:
    """True for a placement this alignez-local knows (``placement_onset`` does not raise)."""
    if not isinstance(placement, str):
        return False
    try:
        placement_onset(placement)
    except AlignezError:
        return False
    return True

KEY_FORM, KEY_CLAMP_FLOOR = "alignez.form", "alignez.clamp_floor"
ADD, CLAMP, KEEP_NORM = "add", "clamp", "keep-norm"
FORMS = (ADD, CLAMP, KEEP_NORM)

MetaValue = str | int | float


class VectorTarget(Protocol):
    """What a control vector is applied to: an engine that adds vectors to its layers' outputs
    (``llama.engine.Engine``; a protocol, so files do not depend on the engine)."""

    n_layer: int

    def control_vector(self, vectors: Mapping[int, np.ndarray]) -> AbstractContextManager[None]: ...


@dataclass(frozen=True, eq=False, repr=False)
class ControlVector(SteeringFile):
    """An immutable set of steering directions keyed by the layer whose output each is added to.

    ``directions[N]`` is llama.cpp's ``direction.N``: a float32 (n_embd,) array added to the output
    of layer N (0-based). ``metadata`` holds our own other ``alignez.*`` keys; ``default_strength``
    and ``calibration`` (keyword-only, from SteeringFile) hold the calibrated strength. Arrays are
    copied and made read-only on construction; equality compares values exactly.
    """

    directions: Mapping[int, np.ndarray]
    model_hint: str | None = None
    metadata: Mapping[str, MetaValue] = field(default_factory=dict)
    name: str = "vector"
    gate: Gates | Gate | None = None  # when our runtime applies it (None: always); a Gate or list of them: Gates

    _ARRAYS = "directions"

    def __post_init__(self) -> None:
        where = f"control vector {self.name!r}"
        if not isinstance(self.directions, Mapping) or len(self.directions) == 0:
            raise AlignezError(f"{where} has no directions; it needs at least one layer")
        dirs: dict[int, np.ndarray] = {}
        width: int | None = None
        for key, vec in self.directions.items():
            layer, arr = layer_array(key, vec, where, "layer")
            if arr.ndim != 1 or arr.size == 0 or arr.size > MAX_N_EMBD:
                raise AlignezError(
                    f"{where}: layer {layer} has shape {arr.shape}; each direction must be 1-D with 1..{MAX_N_EMBD} values"
                )
            if width is None:
                width = arr.size
            elif arr.size != width:
                raise AlignezError(
                    f"{where}: layer {layer} has {arr.size} values but others have {width}; "
                    "all directions must have the same width"
                )
            arr.setflags(write=False)
            dirs[layer] = arr
        meta: dict[str, MetaValue] = {}
        for k, v in dict(self.metadata).items():
            if not isinstance(k, str) or not k.startswith(META_PREFIX):
                raise AlignezError(f"control vector metadata key {k!r} must start with {META_PREFIX!r}")
            if k in RESERVED_KEYS or k == KEY_GATE:
                raise AlignezError(f"control vector metadata key {k!r} is set through its own field, not metadata")
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (str, int, float, np.integer, np.floating)):
                raise AlignezError(f"control vector metadata {k!r} must be a str, int or float, got {type(v).__name__}")
            meta[k] = v.item() if isinstance(v, (np.integer, np.floating)) else v
        if self.model_hint is not None and not isinstance(self.model_hint, str):
            raise AlignezError(f"control vector model_hint must be a string, got {self.model_hint!r}")
        # frozen=True blocks normal assignment; these are the normalised, read-only copies.
        object.__setattr__(self, "directions", MappingProxyType(dict(sorted(dirs.items()))))
        object.__setattr__(self, "metadata", MappingProxyType(meta))
        object.__setattr__(self, "name", str(self.name))
        if not is_placement(meta.get(KEY_PLACEMENT, EVERY_TOKEN)):
            raise AlignezError(f"{where}: placement {meta[KEY_PLACEMENT]!r} is unknown to this alignez-local "
                               f"(it knows {', '.join(PLACEMENTS)}, {ANSWER_AFTER}:N); upgrade alignez-local to use this file")
        if meta.get(KEY_FORM, ADD) not in FORMS:
            raise AlignezError(f"{where}: form {meta[KEY_FORM]!r} is unknown to this alignez-local "
                               f"(it knows {', '.join(FORMS)}); upgrade alignez-local to use this file")
        if self.form == CLAMP:
            floors = self.clamp_floor  # raises for a missing or broken floor record
            if set(floors) != set(dirs):
                raise AlignezError(f"{where}: a clamp vector needs a floor for each of its layers "
                                   f"({sorted(dirs)}); {KEY_CLAMP_FLOOR} has {sorted(floors)}")
        if self.gate is not None:
            gates = Gates.of(self.gate)  # raises for anything but Gates, a Gate or a list of them
            if gates.width != width:
                raise AlignezError(f"{where}: the gate has width {gates.width} but the directions have {width}")
            object.__setattr__(self, "gate", gates)
        self._check_calibration(where)

    def _eq_fields(self) -> dict[str, Any]:
        """Return hint, metadata and name, with the calibration fields."""
        return {**super()._eq_fields(), "hint": self.model_hint, "meta": dict(self.metadata), "name": self.name,
                "gate": self.gate}

    @property
    def placement(self) -> str:
        """Which tokens our runtime adds this vector to (``PLACEMENTS`` or ``answer-after:N``); llama.cpp
        adds it to every token."""
        return str(self.metadata.get(KEY_PLACEMENT, EVERY_TOKEN))

    def placed(self, placement: str) -> ControlVector:
        """Return this vector added at ``placement`` (the same directions, gate and calibration)."""
        placement_onset(placement)  # raises for an unknown one
        meta = {k: v for k, v in self.metadata.items() if k != KEY_PLACEMENT}
        if placement != EVERY_TOKEN:
            meta[KEY_PLACEMENT] = placement  # the default is not written: such files stay as they were
        return dataclasses.replace(self, metadata=meta)

    @property
    def form(self) -> str:
        """How our runtime applies this vector (``FORMS``); llama.cpp always adds it as a constant."""
        return str(self.metadata.get(KEY_FORM, ADD))

    @property
    def clamp_floor(self) -> dict[int, float]:
        """Return layer -> the plain answers' mean component along the unit direction (clamp vectors)."""
        raw = self.metadata.get(KEY_CLAMP_FLOOR)
        try:
            floors = {int(k): float(v) for k, v in json.loads(str(raw)).items()}
        except (TypeError, ValueError, AttributeError):
            raise AlignezError(f"control vector {self.name!r}: {KEY_CLAMP_FLOOR} is missing or not a JSON object "
                               "of layer -> number; the file is damaged or was not written by alignez") from None
        if not all(np.isfinite(v) for v in floors.values()):
            raise AlignezError(f"control vector {self.name!r}: {KEY_CLAMP_FLOOR} holds a non-finite number")
        return floors

    def formed(self, form: str, plain_mean: Mapping[int, np.ndarray] | None = None) -> ControlVector:
        """Return this vector applied in ``form`` (the same directions, gate and calibration).
        ``plain_mean``: layer -> the plain (negative) answers' mean state, which a clamp's floor is
        read from (the component along each unit direction)."""
        if form not in FORMS:
            raise AlignezError(f"unknown form {form!r}; use one of {', '.join(FORMS)}")
        meta = {k: v for k, v in self.metadata.items() if k not in (KEY_FORM, KEY_CLAMP_FLOOR)}
        if form == CLAMP:
            if plain_mean is None or any(L not in plain_mean for L in self.directions):
                raise AlignezError("a clamp vector needs the plain answers' mean state at each of its layers")
            meta[KEY_FORM] = CLAMP
            meta[KEY_CLAMP_FLOOR] = json.dumps({str(L): round(float(np.dot(np.asarray(plain_mean[L], np.float64), unit(d))), 6)
                                                for L, d in self.directions.items()})
        elif form != ADD:
            meta[KEY_FORM] = form
        return dataclasses.replace(self, metadata=meta)  # add is not written: such files stay as they were

    # Makes numpy scalars defer to our __rmul__ (np.float64(2) * cv) instead of wrapping cv in an array.
    __array_ufunc__ = None

    def _repr_fields(self) -> dict[str, Any]:
        """Return what the repr shows (not the arrays)."""
        out = {"name": self.name, "n_embd": self.n_embd, "layers": self.layers, "model_hint": self.model_hint}
        g = self.gate
        return {**out, "gated_at": g.layers[0] if len(g) == 1 else f"{g.rule} of {g.layers}"} if isinstance(g, Gates) else out

    def describe(self) -> dict[str, Any]:
        """Return the facts ``inspect`` shows: hint, width, layers, per-layer norms, metadata, calibration."""
        return {
            "model_hint": self.model_hint,
            "n_embd": self.n_embd,
            "layers": self.layers,
            "norms": {L: round(float(np.linalg.norm(d)), 4) for L, d in self.directions.items()},
            "metadata": dict(self.metadata),
            "gate": None if not isinstance(self.gate, Gates) else
            {**self.gate.describe(), "llama.cpp": "loads this file as a plain vector: it ignores the gates and steers every prompt"},
            # Shown only when it is not what llama.cpp does, so a user knows the two differ.
            **({"placement": f"{self.placement} in alignez (llama.cpp adds it at every token)"}
               if self.placement != EVERY_TOKEN else {}),
            **({"form": f"{self.form} in alignez (llama.cpp adds it as a constant)"} if self.form != ADD else {}),
            **super().describe(),
        }

    # -- arithmetic (like repeng) ----------------------------------------------------------------
    # Results carry no default_strength or calibration: a sum or a rescaled vector was not the one
    # calibrated, so its users get 1.0 until it is calibrated again. A rescaled vector keeps its
    # gate; a sum keeps a gate only when both sides have the same one (one gate cannot decide for
    # the other side's directions, and dropping it would steer prompts it was made to leave alone).

    def _combine(self, other: ControlVector, sign: float, op: str) -> ControlVector:
        """Return the per-layer sum ``self + sign * other`` over the union of layers."""
        if other.n_embd != self.n_embd:
            raise AlignezError(
                f"cannot combine vector {self.name!r} (width {self.n_embd}) with {other.name!r} "
                f"(width {other.n_embd}); they were made for different models"
            )
        out: dict[int, np.ndarray] = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for layer in sorted(set(self.directions) | set(other.directions)):
                acc = np.zeros(self.n_embd, dtype=np.float64)
                if layer in self.directions:
                    acc += self.directions[layer]
                if layer in other.directions:
                    acc += sign * other.directions[layer].astype(np.float64)
                out[layer] = acc.astype(np.float32)
        if self.placement != other.placement:
            raise AlignezError(
                f"cannot combine vector {self.name!r} ({self.placement}) with {other.name!r} ({other.placement}): "
                "they are added to different tokens; load them as two vectors instead"
            )
        if CLAMP in (self.form, other.form):
            raise AlignezError(f"cannot combine vector {self.name!r} with {other.name!r}: a clamp vector raises its "
                               "own direction's component, which a sum would not; load them as two vectors instead")
        if self.form != other.form:
            raise AlignezError(f"cannot combine vector {self.name!r} ({self.form}) with {other.name!r} ({other.form}): "
                               "they are applied differently; load them as two vectors instead")
        if self.gate != other.gate:
            raise AlignezError(
                f"cannot combine vector {self.name!r} with {other.name!r}: their gates differ (a gated vector "
                "steers only the prompts its gate opens on); load them as two vectors instead"
            )
        # Keep only metadata both sides agree on: anything else would describe just one of them.
        meta = {k: v for k, v in self.metadata.items() if other.metadata.get(k) == v}
        # Like repeng, the left operand's hint wins; a missing hint is filled from the right one.
        hint = self.model_hint if self.model_hint is not None else other.model_hint
        return ControlVector(out, hint, meta, f"{self.name}{op}{other.name}", gate=self.gate)

    def _scaled(self, k: float, label: str) -> ControlVector:
        """Return every direction multiplied by ``k``."""
        with np.errstate(over="ignore", invalid="ignore"):
            out = {L: (v.astype(np.float64) * k).astype(np.float32) for L, v in self.directions.items()}
        return ControlVector(out, self.model_hint, dict(self.metadata), label, gate=self.gate)

    def __add__(self, other: object) -> ControlVector:
        """Return the per-layer sum (union of layers)."""
        if not isinstance(other, ControlVector):
            return NotImplemented
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: object) -> ControlVector:
        """Return the per-layer difference (union of layers)."""
        if not isinstance(other, ControlVector):
            return NotImplemented
        return self._combine(other, -1.0, "-")

    def __mul__(self, k: object) -> ControlVector:
        """Return the vector scaled by the number ``k``."""
        if not is_number(k):
            return NotImplemented
        s = finite_scalar(k, "a control vector scale")
        return self._scaled(s, f"{self.name}*{s:g}")

    def __rmul__(self, k: object) -> ControlVector:
        """Return the vector scaled by the number ``k``."""
        return self.__mul__(k)

    def __truediv__(self, k: object) -> ControlVector:
        """Return the vector divided by the non-zero number ``k``."""
        if not is_number(k):
            return NotImplemented
        s = finite_scalar(k, "a control vector divisor")
        if s == 0.0:
            raise AlignezError(f"cannot divide control vector {self.name!r} by zero")
        return self._scaled(1.0 / s, f"{self.name}/{s:g}")

    def __neg__(self) -> ControlVector:
        """Return the vector pointing the other way."""
        return self._scaled(-1.0, f"-{self.name}")

    # -- use with a model ------------------------------------------------------------------------

    def _check_layers(self, n_layer: int) -> None:
        """Return nothing when every layer can be steered in a model of ``n_layer`` layers."""
        if 0 in self.directions:
            raise AlignezError(
                f"vector {self.name} has a direction for layer 0, which llama.cpp cannot steer "
                f"(1..{n_layer - 1} usable); remove it"
            )
        too_high = [L for L in self.directions if L >= n_layer]
        if too_high:
            raise AlignezError(
                f"vector {self.name} has direction.{max(too_high)} but the model has {n_layer} layers "
                f"(1..{n_layer - 1} usable)"
            )

    @contextmanager
    def apply(self, engine: VectorTarget, strength: float | None = None) -> Iterator[None]:
        """Steer everything ``engine`` generates inside this block with the vector at ``strength``
        (None: the file's calibrated strength, else 1), through llama.cpp's own control vector, as
        ``--control-vector-scaled`` does. A gated vector decides per prompt, which a block around
        any generation cannot: steer it with ``alignez_local.generate`` (or ``Steering``) instead."""
        if self.gate is not None:
            raise AlignezError(f"vector {self.name} is gated (it steers only the prompts its gate opens on); "
                               "use alignez_local.generate(engine, prompts, vector) to apply it")
        if self.placement != EVERY_TOKEN:
            raise AlignezError(f"vector {self.name} is added to {placement_words(self.placement)}, which a block around "
                               "any generation cannot do; use alignez_local.generate(engine, prompts, vector)")
        if self.form != ADD:
            raise AlignezError(f"vector {self.name} is a {self.form} vector, which llama.cpp's adapter cannot apply; "
                               "use alignez_local.generate(engine, prompts, vector)")
        s = self.default_strength_or_one if strength is None else check_strength(float(strength))
        with engine.control_vector({L: s * d for L, d in self.directions.items() if 1 <= L < engine.n_layer}):
            yield

    def check_compatible(self, n_layer: int, n_embd: int, arch: str) -> list[str]:
        """Return warnings about using this vector on a model; raise AlignezError if it cannot work.

        Errors: width differs from ``n_embd``; a direction for a layer the model lacks (or layer 0).
        Warnings: made for another architecture (``model_hint``) or another layer count.
        """
        if self.n_embd != n_embd:
            raise AlignezError(
                f"vector {self.name} has width {self.n_embd} but model has n_embd {n_embd}; "
                "it was made for another model"
            )
        self._check_layers(n_layer)
        if isinstance(self.gate, Gates) and max(self.gate.layers) >= n_layer:
            raise AlignezError(f"vector {self.name} is gated at layer {max(self.gate.layers)} but the model has {n_layer} layers")
        warnings: list[str] = []
        if self.model_hint and arch and self.model_hint != arch:
            warnings.append(f"vector {self.name} was made for {self.model_hint!r}, model is {arch!r}")
        made_for = self.metadata.get(META_N_LAYER)
        if isinstance(made_for, int) and made_for != n_layer:
            warnings.append(f"vector {self.name} was made for a model with {made_for} layers; this one has {n_layer}")
        return warnings


def unit(direction: np.ndarray) -> np.ndarray:
    """Return ``direction`` scaled to norm 1 (float64; a zero direction stays zero)."""
    d = np.asarray(direction, dtype=np.float64)
    n = float(np.linalg.norm(d))
    return d / n if n > 0 else d


# -- reading ------------------------------------------------------------------------------------


def _direction_layers(contents: GGUFContents) -> dict[str, int]:
    """Return tensor name -> layer after checking the tensors exactly as llama.cpp's loader does.

    Stricter than llama.cpp in three ways: N must be plain digits without leading zeros (stoi
    would read "direction.01" and "direction.1x" as 1), N <= 4096 and n_embd <= 65536.
    """
    path = contents.path
    if not contents.tensors:
        raise AlignezError(f"{path} holds no direction tensors; it is not a usable control vector")
    layers: dict[str, int] = {}
    width: int | None = None
    first = ""
    for name, t in contents.tensors.items():
        m = DIRECTION_RE.fullmatch(name)
        if m is None:
            raise AlignezError(
                f"{path} has a tensor named {name!r}; a control vector may only hold direction.N tensors "
                "(llama.cpp refuses the file)"
            )
        digits = m.group(1)
        if len(digits) > 1 and digits.startswith("0"):
            raise AlignezError(f"{path} has a tensor named {name!r}; write the layer number without leading zeros")
        layer = int(digits)
        if layer == 0:
            raise AlignezError(
                f"{path} has direction.0; llama.cpp refuses control vectors with a layer-0 direction "
                "(layers start at 1)"
            )
        if layer > MAX_LAYER:
            raise AlignezError(f"{path} has {name}; layer numbers above {MAX_LAYER} are not plausible")
        if t.type_name != "F32":
            raise AlignezError(f"{path}: tensor {name} is {t.type_name}; llama.cpp only loads F32 control vectors")
        if len(t.shape) != 1:
            raise AlignezError(
                f"{path}: tensor {name} has shape {t.shape}; control vector tensors must be 1-D"
            )
        size = t.shape[0]
        if not 1 <= size <= MAX_N_EMBD:
            raise AlignezError(f"{path}: tensor {name} has {size} values; expected 1..{MAX_N_EMBD}")
        if width is None:
            width, first = size, name
        elif size != width:
            raise AlignezError(
                f"{path}: tensor {name} has {size} values but {first} has {width}; "
                "all directions must have the same length"
            )
        layers[name] = layer
    return layers


def read_control_vector(path: str | os.PathLike[str]) -> ControlVector:
    """Return the control vector in a GGUF file (llama.cpp cvector-generator, repeng, or ours).

    Every tensor must be ``direction.N`` (N >= 1), F32, 1-D, all of one length, with finite values;
    anything else raises AlignezError, as does a model or profile given by mistake.
    """
    # The header checks bound the data to MAX_LAYER * MAX_N_EMBD floats before it is read.
    contents, layers = read_in_two_passes(path, "control-vector", _direction_layers, unknown_ok=True)
    directions: dict[int, np.ndarray] = {}
    for name, layer in layers.items():
        data = contents.tensors[name].data
        assert data is not None  # read_in_two_passes guarantees it for F32 tensors
        if not np.all(np.isfinite(data)):
            bad = int(np.count_nonzero(~np.isfinite(data)))
            raise AlignezError(
                f"{contents.path}: tensor {name} contains {bad} NaN or infinite values; "
                "the file is damaged or was made wrongly"
            )
        directions[layer] = data
    md = contents.metadata
    hint = md.get(KEY_MODEL_HINT)
    meta: dict[str, MetaValue] = {}
    for key, value in md.items():
        if key.startswith(META_PREFIX) and key not in RESERVED_KEYS and key != KEY_GATE and isinstance(value, (str, int, float)) \
                and not isinstance(value, bool):
            meta[key] = value
    return ControlVector(
        directions=directions,
        model_hint=hint if isinstance(hint, str) and hint else None,
        metadata=meta,
        name=contents.path.stem,
        gate=Gates.from_json(md[KEY_GATE], str(contents.path)) if KEY_GATE in md else None,
        **read_calibration(contents, str(contents.path)),
    )


# -- writing ------------------------------------------------------------------------------------


def _meta_kv(key: str, value: MetaValue) -> tuple[str, GGUFValueType, Any]:
    """Return the (key, GGUF type, value) triple that stores one metadata value without loss."""
    if isinstance(value, str):
        return key, GGUFValueType.STRING, value
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            return key, GGUFValueType.INT64, value
        if 0 <= value < (1 << 64):
            return key, GGUFValueType.UINT64, value
        raise AlignezError(f"metadata {key!r} = {value} does not fit in 64 bits")
    return key, GGUFValueType.FLOAT64, float(value)


def write_control_vector(path: str | os.PathLike[str], cv: ControlVector) -> Path:
    """Return the written path after saving ``cv`` atomically as a llama.cpp control vector GGUF.

    Writes ``direction.N`` F32 tensors, ``general.architecture = "controlvector"``,
    ``controlvector.model_hint`` (when known), ``controlvector.layer_count`` (uint32: the model's
    layer count from ``alignez.model.n_layer`` when present, else the highest layer + 1) and
    every ``alignez.*`` metadata key, with ``alignez.default_strength`` (F32) and
    ``alignez.calibration`` (JSON) when set.
    """
    if 0 in cv.directions:
        raise AlignezError(
            f"cannot write {cv.name}: it has a direction for layer 0, and a direction.0 tensor makes "
            "llama.cpp refuse the whole file; drop layer 0"
        )
    n_layer = cv.metadata.get(META_N_LAYER)
    layer_count = n_layer if isinstance(n_layer, int) and 0 < n_layer < (1 << 32) else max(cv.layers) + 1
    kvs: list[tuple[str, GGUFValueType, Any]] = []
    if cv.model_hint:
        kvs.append((KEY_MODEL_HINT, GGUFValueType.STRING, cv.model_hint))
    kvs.append((KEY_LAYER_COUNT, GGUFValueType.UINT32, int(layer_count)))
    kvs.extend(_meta_kv(k, v) for k, v in sorted(cv.metadata.items()))
    kvs.extend(cv.calibration_kvs())
    if isinstance(cv.gate, Gates):
        kvs.append((KEY_GATE, GGUFValueType.STRING, json.dumps(cv.gate.as_json())))
    tensors = [(f"direction.{layer}", cv.directions[layer].astype("<f4")) for layer in cv.layers]
    return write_gguf(path, CONTROL_VECTOR_ARCH, kvs, tensors)

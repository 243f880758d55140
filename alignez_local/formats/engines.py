"""Control vectors in other steering tools' files: repeng, EasySteer, IBM activation-steering and
steering-vectors. docs/engines.md is the convention table this module implements, each row read
from the tool's own source.

Every tool adds ``scale x vector`` to the residual stream, so a file carries across once two things
are settled:

- **the layer**: our ``direction.N`` (llama.cpp's) is added to the OUTPUT of decoder block N (0-based,
  ``l_out-N``; Hugging Face ``hidden_states[N + 1]``). repeng, EasySteer and steering-vectors hook
  the same point under the same N. IBM activation-steering adds ``directions[K]`` to the INPUT of
  block K, which is the output of block K - 1: our N is its K = N + 1 (``shift``).
- **the scale**: each multiplies the file's vector by one number (repeng ``coeff``, EasySteer
  ``scale``, IBM ``behavior_vector_strength``, steering-vectors ``multiplier``; all default to 1
  except EasySteer's, which is required). By default the strength is folded into the file (the tool's
  scale 1 gives our calibrated steering) and recorded, so that importing it back divides it out.

The GGUF tools' files are our own layout (formats/control_vector.py writes them); IBM's ``.svec`` is
JSON; steering-vectors has no file format of its own, so we write safetensors (tensor ``N`` per layer,
the ``safetensors`` package's numpy API: the ``engines`` extra). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.fileio import atomic_write, check_writable
from alignez_local.formats.control_vector import (
    ADD,
    EVERY_TOKEN,
    META_N_LAYER,
    ControlVector,
    placement_words,
    read_control_vector,
    write_control_vector,
)
from alignez_local.specs import check_strength

KEY_FOLDED = "alignez.folded_strength"  # the strength multiplied into the file's directions
KEY_STATED = "alignez.stated_strength"  # the strength to give the tool, when not folded in
KEY_ENGINE = "alignez.export.engine"
UNKNOWN_HINT = "unknown"  # repeng's and EasySteer's import_gguf refuse a file without a model hint


@dataclass(frozen=True)
class EngineFormat:
    """One tool's convention: its file, how its layer keys relate to ours, how it takes the scale."""

    name: str
    suffix: str
    shift: int  # the tool's layer key = our direction.N + shift
    adds_to: str  # where in the residual stream, in the tool's own terms
    scale_name: str
    usage: str  # one line; {path}, {layers} (the tool's keys) and {scale} are filled in


ENGINES: dict[str, EngineFormat] = {
    "repeng": EngineFormat(
        "repeng", ".gguf", 0, "output of model.layers[N]", "coeff",
        "ControlModel(model, layer_ids={layers}).set_control(ControlVector.import_gguf('{path}'), coeff={scale})"),
    "easysteer": EngineFormat(
        "easysteer", ".gguf", 0, "output of decoder layer N", "scale",
        "VectorSpec(source='{path}', algorithm='direct', scale={scale}, layers={layers})"),
    "ibm": EngineFormat(
        "ibm", ".svec", 1, "input of model.layers[N + 1]", "behavior_vector_strength",
        "MalleableModel(model, tokenizer).steer(behavior_vector=SteeringVector.load('{path}'), "
        "behavior_layer_ids={layers}, behavior_vector_strength={scale})"),
    "steering-vectors": EngineFormat(
        "steering-vectors", ".safetensors", 0, "output of model.layers[N]", "multiplier",
        "SteeringVector({{int(k): v for k, v in safetensors.torch.load_file('{path}').items()}}, "
        "'decoder_block').apply(model, multiplier={scale})"),
}
GGUF_SOURCES = ("llama.cpp", "repeng", "easysteer")  # one file layout, one layer convention
SOURCES = (*GGUF_SOURCES, "ibm", "steering-vectors")


@dataclass(frozen=True)
class Exported:
    """What ``write_for_engine`` wrote: the file, the tool's layer keys and the scale to give it."""

    path: Path
    engine: EngineFormat
    layers: list[int]
    scale: float
    folded: float | None  # the strength multiplied into the file, None when not folded

    def lines(self) -> list[str]:
        """Return the two lines the CLI prints: what was written, and how the tool loads it."""
        e = self.engine
        how = (f"strength {self.folded:g} folded in: use {e.scale_name} {self.scale:g}" if self.folded is not None
               else f"use {e.scale_name} {self.scale:g} (the calibrated strength; not folded in)")
        return [f"{self.path}: for {e.name}, layers {self.layers} ({e.adds_to}), {how}",
                "  " + e.usage.format(path=self.path, layers=self.layers, scale=f"{self.scale:g}")]


def engine_format(name: str) -> EngineFormat:
    """Return the convention of ``name`` or raise AlignezError listing the known ones."""
    if name not in ENGINES:
        raise AlignezError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    return ENGINES[name]


def _safetensors() -> Any:
    """Return the safetensors numpy API (the ``engines`` extra), loaded on first use."""
    try:
        import safetensors.numpy  # noqa: PLC0415 - optional dependency, loaded on first use
    except ImportError:
        raise AlignezError("steering-vectors files are safetensors; install the reader with "
                           "pip install 'alignez-local[engines]'") from None
    return safetensors.numpy


def _warn_differences(cv: ControlVector, engine: EngineFormat, on_warning: Callable[[str], None]) -> None:
    """Say what our runtime does with this vector that the other tool will not."""
    if cv.gate is not None:
        on_warning(f"{cv.name} is gated; {engine.name} ignores the gate and steers every prompt")
    if cv.placement != EVERY_TOKEN:
        on_warning(f"{cv.name} is added to {placement_words(cv.placement)} by alignez; {engine.name} adds it to every token")
    if cv.form != ADD:
        on_warning(f"{cv.name} is a {cv.form} vector; {engine.name} adds it as a constant")


def write_for_engine(cv: ControlVector, to: str, out: str | os.PathLike[str], strength: float | None = None,
                     fold: bool = True, on_warning: Callable[[str], None] = lambda _m: None) -> Exported:
    """Write ``cv`` as ``to``'s file at ``out`` and return what was written.

    ``strength``: the one to fold in (``fold``) or to state; None: the file's calibrated strength
    (1 when it has none). Folding multiplies in float64 and stores float32, so importing back gives
    the directions to within float32 rounding; unfolded files keep them bit for bit.
    """
    engine = engine_format(to)
    out = check_writable(out)
    s = check_strength(float(cv.default_strength_or_one if strength is None else strength))
    _warn_differences(cv, engine, on_warning)
    dirs = {L: (np.asarray(d, np.float64) * s).astype(np.float32) if fold else np.asarray(d, np.float32)
            for L, d in cv.directions.items()}
    keys = _shifted(cv, engine)
    folded, scale = (s, 1.0) if fold else (None, s)
    hint = cv.model_hint or UNKNOWN_HINT
    note = {KEY_ENGINE: engine.name, "alignez.name": cv.name}
    note[KEY_FOLDED if fold else KEY_STATED] = s
    if engine.suffix == ".gguf":
        meta = {**cv.metadata, **note}
        if not fold:
            del meta[KEY_STATED]  # the file's own default strength says it
        copy = ControlVector(directions=dirs, model_hint=hint, metadata=meta, name=cv.name,
                             default_strength=None if fold else s,
                             calibration=cv.calibration if not fold and s == cv.default_strength else None)
        write_control_vector(out, copy)
    elif engine.name == "ibm":
        _write_svec(out, hint, {k: dirs[L] for L, k in keys.items()}, {**cv.metadata, **note})
    else:
        st = _safetensors()
        meta = {k: str(v) for k, v in {**cv.metadata, **note, "model_hint": hint}.items()}
        data = st.save({str(k): np.ascontiguousarray(dirs[L]) for L, k in keys.items()}, metadata=meta)
        with atomic_write(out, "wb") as fh:
            fh.write(data)
    return Exported(out, engine, sorted(keys.values()), scale, folded)


def _shifted(cv: ControlVector, engine: EngineFormat) -> dict[int, int]:
    """Return our layer -> the tool's key, refusing a layer the tool cannot reach."""
    keys = {L: L + engine.shift for L in cv.layers}
    n_layer = cv.metadata.get(META_N_LAYER)
    if engine.shift and isinstance(n_layer, int) and max(keys.values()) >= n_layer:
        last = max(cv.layers)
        raise AlignezError(f"{cv.name} steers layer {last}, the model's last; {engine.name} adds its vectors to a "
                           f"block's input, and no block {last + 1} exists: drop layer {last} first")
    return keys


def _write_svec(out: Path, hint: str, directions: dict[int, np.ndarray], meta: dict[str, Any]) -> None:
    """Write IBM activation-steering's ``.svec``: JSON with model_type, directions (layer key -> list)
    and explained_variances; our own record goes under a key its loader does not read."""
    data = {"model_type": hint,
            "directions": {str(k): [float(x) for x in v] for k, v in sorted(directions.items())},
            # Its loader needs the key; the values are PCA statistics a difference of means has not.
            "explained_variances": {},
            "alignez": meta}
    with atomic_write(out) as fh:
        json.dump(data, fh)


# -- reading ------------------------------------------------------------------------------------


def source_of(path: str | os.PathLike[str]) -> str:
    """Return the tool a file comes from, by its suffix (GGUF: llama.cpp's layout)."""
    suffix = Path(path).suffix.lower()
    for name in ("ibm", "steering-vectors"):
        if suffix == ENGINES[name].suffix:
            return name
    if suffix == ".gguf":
        return "llama.cpp"
    raise AlignezError(f"cannot tell which tool wrote {path} from its name; say it with --from "
                       f"({', '.join(SOURCES)})")


def read_from_engine(path: str | os.PathLike[str], source: str | None = None) -> ControlVector:
    """Return the control vector in another tool's file, in our layer convention.

    A strength we folded in on export is divided out again and becomes the default strength.
    """
    source = source or source_of(path)
    if source not in SOURCES:
        raise AlignezError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    name = Path(path).stem
    if source in GGUF_SOURCES:
        cv = read_control_vector(path)
        raw, meta, hint = dict(cv.directions), dict(cv.metadata), cv.model_hint
        if KEY_FOLDED not in meta:  # bit for bit, with its own strength, calibration and gate
            return dataclasses.replace(cv, metadata=_ours(meta))
    elif source == "ibm":
        raw, meta, hint = _read_svec(path)
    else:
        raw, meta, hint = _read_safetensors(path)
    shift = 0 if source in GGUF_SOURCES else ENGINES[source].shift
    dirs: dict[int, np.ndarray] = {}
    for key, vec in raw.items():
        layer = key - shift
        if layer < 1:
            where = f"the input of block {key}" if shift else f"the output of block {key}"
            raise AlignezError(f"{path}: layer key {key} is {where}; llama.cpp cannot steer there "
                               "(control vectors start at the output of block 1)")
        dirs[layer] = vec
    folded, stated = meta.pop(KEY_FOLDED, None), meta.pop(KEY_STATED, None)
    strength = None if stated is None else check_strength(float(stated), f"{path}: {KEY_STATED}")
    if folded is not None:
        strength = check_strength(float(folded), f"{path}: {KEY_FOLDED}")
        if strength == 0:
            raise AlignezError(f"{path}: its directions were multiplied by 0 on export; the vector cannot be recovered")
        dirs = {L: (np.asarray(d, np.float64) / strength).astype(np.float32) for L, d in dirs.items()}
    meta = _ours(meta)
    return ControlVector(directions=dirs, model_hint=None if hint in (None, "", UNKNOWN_HINT) else hint,
                         metadata=meta, name=name, default_strength=strength)


def _ours(meta: dict[str, Any]) -> dict[str, Any]:
    """Return the vector's own metadata, without the export's notes."""
    return {k: v for k, v in meta.items() if k.startswith("alignez.") and k not in (KEY_ENGINE, "alignez.name")}


def _meta_values(meta: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return our ``alignez.*`` record with values as ControlVector metadata takes them."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if not isinstance(k, str) or not k.startswith("alignez.") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float, str)):
            out[k] = v
    for key in (KEY_FOLDED, KEY_STATED):
        if key in out:
            try:
                out[key] = float(out[key])
            except ValueError:
                raise AlignezError(f"{path}: {key} is not a number") from None
    return out


def _read_svec(path: str | os.PathLike[str]) -> tuple[dict[int, np.ndarray], dict[str, Any], str | None]:
    """Return (key -> direction, our record, model type) from IBM activation-steering's ``.svec``."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        raw = {int(k): np.asarray(v, dtype=np.float64) for k, v in data["directions"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AlignezError(f"{path} is not an IBM activation-steering .svec file "
                           f"(JSON with model_type and directions): {e}") from None
    record = data.get("alignez") if isinstance(data.get("alignez"), dict) else {}
    hint = data.get("model_type") if isinstance(data.get("model_type"), str) else None
    return {k: _float32(v, path, k) for k, v in raw.items()}, _meta_values(record, path), hint


def _read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[int, np.ndarray], dict[str, Any], str | None]:
    """Return (layer -> direction, our record, model hint) from a safetensors file of layer tensors."""
    st = _safetensors()
    try:
        blob = Path(path).read_bytes()
        tensors = st.load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error types; any of them means "not this format"
        raise AlignezError(f"{path} is not a safetensors file: {e}") from None
    raw: dict[int, np.ndarray] = {}
    for k, v in tensors.items():
        if not k.isdigit():
            raise AlignezError(f"{path} has a tensor named {k!r}; a steering-vectors file holds one tensor per "
                               "layer, named by the layer number")
        raw[int(k)] = _float32(v, path, int(k))
    hint = meta.get("model_hint")
    return raw, _meta_values(meta, path), hint if isinstance(hint, str) else None


def _float32(v: np.ndarray, path: str | os.PathLike[str], key: int) -> np.ndarray:
    """Return one direction as float32, refusing what no tool would add to a residual stream."""
    arr = np.asarray(v)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
        raise AlignezError(f"{path}: layer {key} is not a 1-D vector of finite floats (shape {arr.shape}, {arr.dtype})")
    return arr.astype(np.float32)

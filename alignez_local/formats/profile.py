"""SteeringProfile: the per-layer persona subspaces AlignEZ edits with, saved as a versioned GGUF file.

File layout (GGUF, so the one strict reader in ``gguf_file`` serves both formats):
- ``general.architecture = "alignez-profile"``;
- ``alignez.profile.version`` (uint32) = ``PROFILE_FORMAT_VERSION``;
- ``alignez.profile.meta``: a JSON string with name, site, method, axis, layer_stats, params and
  provenance (layer_stats keys are layer numbers written as strings);
- optionally ``alignez.default_strength`` (F32) and ``alignez.calibration`` (JSON string), the
  calibrated strength, as in control vectors (see ``steering_file``);
- tensors ``subspace.L`` F32, numpy shape (k_L, n_embd); GGUF stores dimensions fastest-first, so
  the file's ``ne`` is (n_embd, k_L) and the reader reverses it back.
Tensor names are not ``direction.N``, so llama.cpp refuses a profile given as a control vector,
which is intended: a profile drives the input-dependent edit, not a constant addition.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf import GGUFValueType

from alignez_local.errors import AlignezError
from alignez_local.formats.gguf_file import GGUFContents
from alignez_local.formats.gguf_write import write_gguf
from alignez_local.formats.kinds import PROFILE_ARCH
from alignez_local.formats.steering_file import (
    MAX_LAYER,
    MAX_N_EMBD,
    SteeringFile,
    freeze_json,
    is_int,
    json_default,
    layer_array,
    read_calibration,
    read_in_two_passes,
)
from alignez_local.specs import FIT_SITES

PROFILE_FORMAT_VERSION = 1
KEY_VERSION = "alignez.profile.version"
KEY_META = "alignez.profile.meta"
SITES = FIT_SITES
SUBSPACE_RE = re.compile(r"subspace\.(0|[1-9][0-9]*)")
UNIT_TOL = 1e-3  # row norms and pairwise dot products must be within this of orthonormal
REQUIRED_META = ("site", "method", "axis", "provenance")
REQUIRED_PROVENANCE = ("n_embd", "n_layer")
# Set by load_profile so validation messages name the file instead of the profile's display name.
_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("_LABEL", default=None)


@dataclass(frozen=True, eq=False, repr=False)
class SteeringProfile(SteeringFile):
    """Per-layer orthonormal subspaces (rows point from the negative to the positive persona).

    ``subspaces[L]`` is a float32 (k, n_embd) array for layer L (0-based, at ``site``:
    "ffn_out" or "l_out"); ``provenance`` must hold the model's ``n_embd`` and ``n_layer`` (and
    normally arch, model_sha256, model_name, data_sha256, package_version, created).
    """

    subspaces: Mapping[int, np.ndarray]
    site: str
    method: str
    axis: Mapping[str, str]
    layer_stats: Mapping[int, Mapping[str, float]]
    params: Mapping[str, object]
    provenance: Mapping[str, object]
    name: str = "profile"

    _ARRAYS = "subspaces"

    def __post_init__(self) -> None:
        where = f"profile {_LABEL.get() or self.name}"
        if not isinstance(self.site, str) or self.site not in SITES:
            raise AlignezError(f"{where}: site {self.site!r} is not one of {', '.join(SITES)}")
        if not isinstance(self.method, str) or not self.method:
            raise AlignezError(f"{where}: method must be a non-empty string")
        if not isinstance(self.axis, Mapping) or not all(
            isinstance(self.axis.get(k), str) for k in ("name", "positive", "negative")
        ):
            raise AlignezError(f"{where}: axis must give 'name', 'positive' and 'negative' as strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.axis.items()):
            raise AlignezError(f"{where}: axis keys and values must be strings")
        provenance = freeze_json(self.provenance, "provenance", where)
        params = freeze_json(self.params, "params", where)
        n_embd = provenance.get("n_embd")
        n_layer = provenance.get("n_layer")
        if not is_int(n_embd) or not 1 <= int(n_embd) <= MAX_N_EMBD:  # type: ignore[arg-type]
            raise AlignezError(f"{where}: provenance n_embd {n_embd!r} is missing or not a valid width")
        if not is_int(n_layer) or not 1 <= int(n_layer) <= MAX_LAYER + 1:  # type: ignore[arg-type]
            raise AlignezError(f"{where}: provenance n_layer {n_layer!r} is missing or not a valid layer count")
        subspaces = _check_subspaces(self.subspaces, int(n_embd), int(n_layer), where)  # type: ignore[arg-type]
        stats = _check_layer_stats(self.layer_stats, where)
        # frozen=True blocks normal assignment; these are the validated, read-only copies.
        object.__setattr__(self, "subspaces", subspaces)
        object.__setattr__(self, "axis", MappingProxyType(dict(self.axis)))
        object.__setattr__(self, "layer_stats", stats)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "provenance", provenance)
        object.__setattr__(self, "name", str(self.name))
        self._check_calibration(where)

    def _eq_fields(self) -> dict[str, Any]:
        """Return everything but the subspaces (what ``alignez.profile.meta`` holds), with calibration."""
        return {**super()._eq_fields(), **_meta_dict(self)}

    def _repr_fields(self) -> dict[str, Any]:
        """Return what the repr shows: name, site, method and each layer's subspace rank."""
        ks = {L: int(s.shape[0]) for L, s in self.subspaces.items()}
        return {"name": self.name, "site": self.site, "method": self.method, "k": ks}

    def describe(self) -> dict[str, Any]:
        """Return the facts ``inspect`` shows: method, site, axis, layers, ranks, params, provenance, stats."""
        return {
            "method": self.method,
            "site": self.site,
            "axis": dict(self.axis),
            "layers": self.layers,
            "k": {L: int(s.shape[0]) for L, s in self.subspaces.items()},
            "params": dict(self.params),
            "provenance": dict(self.provenance),
            "layer_stats": {L: dict(s) for L, s in self.layer_stats.items()},
            **super().describe(),
        }

    def check_compatible(
        self, n_layer: int, n_embd: int, arch: str, model_sha256: str | None = None
    ) -> list[str]:
        """Return warnings about using this profile on a model; raise AlignezError if it cannot fit.

        Subspaces are specific to one model, so the width and the layer count must both match the
        model the profile was made from. A different architecture name or model file hash only warns.
        """
        made_embd = self.provenance["n_embd"]
        made_layer = self.provenance["n_layer"]
        if made_embd != n_embd or made_layer != n_layer:
            raise AlignezError(
                f"profile {self.name} was made for a model with n_embd {made_embd} and {made_layer} layers, "
                f"but this model has n_embd {n_embd} and {n_layer} layers; build a profile for this model"
            )
        warnings: list[str] = []
        made_arch = self.provenance.get("arch")
        if isinstance(made_arch, str) and made_arch and arch and made_arch != arch:
            warnings.append(f"profile {self.name} was made for {made_arch!r}, model is {arch!r}")
        made_sha = self.provenance.get("model_sha256")
        if model_sha256 and isinstance(made_sha, str) and made_sha and made_sha != model_sha256:
            warnings.append(
                f"profile {self.name} was made from another model file (sha256 {made_sha[:12]}...); "
                "its subspaces may not fit this one"
            )
        return warnings


def _check_subspaces(
    subspaces: Mapping[int, np.ndarray], n_embd: int, n_layer: int, where: str
) -> Mapping[int, np.ndarray]:
    """Return read-only float32 copies of the subspaces after checking shape, range and orthonormality."""
    if not isinstance(subspaces, Mapping) or len(subspaces) == 0:
        raise AlignezError(f"{where} has no subspaces; it needs at least one layer")
    out: dict[int, np.ndarray] = {}
    for key, sub in subspaces.items():
        layer, arr = layer_array(key, sub, where, "subspace")
        if layer >= n_layer:
            raise AlignezError(f"{where}: subspace for layer {layer}, but the model has {n_layer} layers (0..{n_layer - 1})")
        if arr.ndim == 1:
            arr = arr[None, :]  # one direction given as a vector is a k = 1 subspace
        if arr.ndim != 2 or arr.shape[1] != n_embd or not 1 <= arr.shape[0] <= n_embd:
            raise AlignezError(
                f"{where}: subspace {layer} has shape {arr.shape}; expected (k, {n_embd}) with 1 <= k <= {n_embd}"
            )
        gram = arr.astype(np.float64) @ arr.astype(np.float64).T
        norms = np.sqrt(np.diag(gram))
        worst_norm = float(np.max(np.abs(norms - 1.0)))
        if worst_norm > UNIT_TOL:
            raise AlignezError(
                f"{where}: subspace {layer} has a row of norm {norms[np.argmax(np.abs(norms - 1.0))]:.4f}; "
                "rows must be unit vectors"
            )
        off = gram - np.diag(np.diag(gram))
        if arr.shape[0] > 1 and float(np.max(np.abs(off))) > UNIT_TOL:
            raise AlignezError(
                f"{where}: subspace {layer} rows are not orthogonal (|dot| up to {float(np.max(np.abs(off))):.4f})"
            )
        arr.setflags(write=False)
        out[layer] = arr
    return MappingProxyType(dict(sorted(out.items())))


def _check_layer_stats(stats: Mapping[int, Mapping[str, float]], where: str) -> Mapping[int, Mapping[str, Any]]:
    """Return read-only copies of per-layer diagnostics after checking keys and scalar values."""
    if not isinstance(stats, Mapping):
        raise AlignezError(f"{where}: layer_stats must be a mapping of layer -> statistics")
    out: dict[int, Mapping[str, Any]] = {}
    for key, row in stats.items():
        if not is_int(key):
            raise AlignezError(f"{where}: layer_stats key {key!r} is not a layer number")
        if not isinstance(row, Mapping):
            raise AlignezError(f"{where}: layer_stats[{key}] must be a mapping of name -> number")
        clean: dict[str, Any] = {}
        for name, value in row.items():
            if not isinstance(name, str):
                raise AlignezError(f"{where}: layer_stats[{key}] has a non-string key {name!r}")
            if isinstance(value, np.generic):
                value = value.item()
            # None marks a statistic that could not be computed (e.g. no held-out pairs).
            if value is not None and not isinstance(value, (int, float, str)):
                raise AlignezError(f"{where}: layer_stats[{key}][{name!r}] must be a number, got {type(value).__name__}")
            clean[name] = value
        out[int(key)] = MappingProxyType(clean)
    return MappingProxyType(dict(sorted(out.items())))


def _meta_dict(profile: SteeringProfile) -> dict[str, Any]:
    """Return everything but the subspaces as plain JSON-ready data (what ``alignez.profile.meta`` holds)."""
    return {
        "name": profile.name,
        "site": profile.site,
        "method": profile.method,
        "axis": dict(profile.axis),
        "layer_stats": {str(k): dict(v) for k, v in profile.layer_stats.items()},
        "params": dict(profile.params),
        "provenance": dict(profile.provenance),
    }


def save_profile(path: str | os.PathLike[str], profile: SteeringProfile) -> Path:
    """Return the written path after saving ``profile`` atomically as an alignez-profile GGUF."""
    try:
        meta = json.dumps(_meta_dict(profile), default=json_default, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise AlignezError(f"cannot save profile {profile.name}: its metadata is not JSON-serializable ({err})") from None
    kvs = [
        (KEY_VERSION, GGUFValueType.UINT32, PROFILE_FORMAT_VERSION),
        (KEY_META, GGUFValueType.STRING, meta),
        *profile.calibration_kvs(),
    ]
    tensors = [(f"subspace.{L}", profile.subspaces[L].astype("<f4")) for L in profile.layers]
    return write_gguf(path, PROFILE_ARCH, kvs, tensors)


def _check_header(contents: GGUFContents) -> dict[str, Any]:
    """Return the parsed meta JSON after checking the version key and the tensor table."""
    path = contents.path
    md, types = contents.metadata, contents.value_types
    version = md.get(KEY_VERSION)
    if version is None:
        raise AlignezError(f"profile {path} has no {KEY_VERSION} key; the file is damaged or not a profile")
    if not types[KEY_VERSION].is_int:
        raise AlignezError(f"profile {path}: {KEY_VERSION} is {types[KEY_VERSION]}, not an integer; the file is damaged")
    if version > PROFILE_FORMAT_VERSION:
        raise AlignezError(
            f"profile {path} has format version {version}; this alignez-local reads version "
            f"{PROFILE_FORMAT_VERSION}: upgrade alignez-local"
        )
    if version < 1:
        raise AlignezError(f"profile {path} has invalid format version {version}; the file is damaged")
    raw = md.get(KEY_META)
    if not isinstance(raw, str):
        raise AlignezError(f"profile {path} has no {KEY_META} JSON string; the file is damaged")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise AlignezError(f"profile {path}: {KEY_META} is not valid JSON; the file is damaged") from None
    if not isinstance(meta, dict):
        raise AlignezError(f"profile {path}: {KEY_META} is not a JSON object; the file is damaged")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise AlignezError(f"profile {path}: {KEY_META} lacks {', '.join(missing)}; the file is damaged")
    prov = meta["provenance"]
    if not isinstance(prov, dict) or any(not is_int(prov.get(k)) for k in REQUIRED_PROVENANCE):
        raise AlignezError(f"profile {path}: provenance must give n_embd and n_layer as integers; the file is damaged")
    n_embd, n_layer = int(prov["n_embd"]), int(prov["n_layer"])
    if not 1 <= n_embd <= MAX_N_EMBD or not 1 <= n_layer <= MAX_LAYER + 1:
        raise AlignezError(f"profile {path}: provenance n_embd {n_embd} / n_layer {n_layer} are implausible")
    if not contents.tensors:
        raise AlignezError(f"profile {path} holds no subspace tensors; the file is damaged")
    for name, t in contents.tensors.items():
        m = SUBSPACE_RE.fullmatch(name)
        if m is None:
            raise AlignezError(f"profile {path} has an unexpected tensor {name!r}; only subspace.L tensors belong there")
        layer = int(m.group(1))
        if layer >= n_layer:
            raise AlignezError(f"profile {path}: {name} is beyond the model's {n_layer} layers; the file is damaged")
        if t.type_name != "F32":
            raise AlignezError(f"profile {path}: tensor {name} is {t.type_name}, expected F32")
        if len(t.shape) != 2 or t.shape[1] != n_embd or not 1 <= t.shape[0] <= n_embd:
            raise AlignezError(
                f"profile {path}: tensor {name} has shape {t.shape}; expected (k, {n_embd}) with 1 <= k <= {n_embd}"
            )
    return meta


def load_profile(path: str | os.PathLike[str]) -> SteeringProfile:
    """Return the validated steering profile stored in ``path``; raise AlignezError on any problem."""
    # Header checks bound the data to n_layer * n_embd^2 floats of a plausible model before it is read.
    contents, meta = read_in_two_passes(path, "profile", _check_header)
    subspaces = {int(name.split(".", 1)[1]): t.data for name, t in contents.tensors.items()}
    stats_raw = meta.get("layer_stats", {})
    if not isinstance(stats_raw, dict):
        raise AlignezError(f"profile {contents.path}: layer_stats is not a JSON object; the file is damaged")
    stats: dict[int, Any] = {}
    for key, row in stats_raw.items():
        if not re.fullmatch(r"0|[1-9][0-9]{0,4}", key):
            raise AlignezError(f"profile {contents.path}: layer_stats key {key!r} is not a layer number")
        stats[int(key)] = row
    name = meta.get("name")
    token = _LABEL.set(str(contents.path))
    try:
        return SteeringProfile(
            subspaces=subspaces,
            site=meta["site"],
            method=meta["method"],
            axis=meta["axis"],
            layer_stats=stats,
            params=meta.get("params", {}),
            provenance=meta["provenance"],
            name=name if isinstance(name, str) and name else contents.path.stem,
            **read_calibration(contents, f"profile {contents.path}"),
        )
    finally:
        _LABEL.reset(token)


"""What a GGUF file is, read from its header by our own bounded parser (nothing is loaded into
llama.cpp): ``alignez inspect``'s facts, and ``alignez import``'s checked copy of a control vector
from another tool."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from alignez_local.fileio import check_writable, plain
from alignez_local.formats.control_vector import ControlVector, read_control_vector, write_control_vector
from alignez_local.formats.engines import read_from_engine
from alignez_local.formats.gguf_file import read_gguf
from alignez_local.formats.kinds import gguf_kind
from alignez_local.formats.profile import load_profile
from alignez_local.progress import Notify, quiet



def model_facts(path: str | Path) -> dict[str, Any]:
    """Return a model file's arch, name, layer count, width and whether it has a chat template,
    read from its header by our own bounded parser (the model is not loaded)."""
    meta = read_gguf(path, want_data=False, want_arrays=False).metadata
    arch = str(meta.get("general.architecture", ""))
    return {"arch": arch, "name": meta.get("general.name"), "n_layer": meta.get(f"{arch}.block_count"),
            "n_embd": meta.get(f"{arch}.embedding_length"), "chat_template": "tokenizer.chat_template" in meta}

def import_vector(path: str | Path, out: str | Path, model: str | Path | None = None,
                  on_warning: Notify = quiet, source: str | None = None) -> ControlVector:
    """Check a control vector from another tool (against ``model`` when given) and write a clean copy
    to ``out`` that keeps the directions exactly, in our layer convention, and records where it came from.
    ``model``: a model file (``models.resolve_model`` turns a bundled name into one). ``source``: the
    tool (``engines.SOURCES``; None: told by the file's suffix)."""
    out = check_writable(out)
    cv = read_from_engine(path, source)
    if model is not None:
        facts = model_facts(model)
        for w in cv.check_compatible(int(facts["n_layer"] or 0), int(facts["n_embd"] or 0), facts["arch"]):
            on_warning(w)
    copy = dataclasses.replace(cv, metadata={**cv.metadata, "alignez.source": f"import:{Path(path).name}"})
    write_control_vector(out, copy)
    return copy

def describe(path: str | Path) -> dict[str, Any]:
    """Return what a GGUF file is (control vector, profile or model) and its main facts."""
    path = str(path)
    kind = gguf_kind(path)
    if kind == "control-vector":
        return {"kind": kind, "path": path, **plain(read_control_vector(path).describe())}
    if kind == "profile":
        p = load_profile(path)
        return {"kind": kind, "path": path, "method": p.method, "site": p.site, "axis": dict(p.axis),
                "layers": p.layers, "k": {L: int(s.shape[0]) for L, s in p.subspaces.items()},
                "default_strength": p.default_strength, "calibration": plain(p.calibration),
                "params": dict(p.params), "provenance": plain(p.provenance),
                "layer_stats": {L: dict(s) for L, s in p.layer_stats.items()}}
    return {"kind": kind, "path": path, **model_facts(path)}

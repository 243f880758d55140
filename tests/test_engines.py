"""Each tool's exported file, applied in Hugging Face transformers where that tool adds it, changes the
residual stream as our vector changes it in llama.cpp (docs/engines.md). Runs only where torch and
transformers are installed (neither is a dependency; CI installs neither and skips this file). On the
suite's tiny random-weight model: about 15 s on one core, most of it importing torch and transformers.
scripts/engine_check.py runs the same check on Qwen2.5-Coder-0.5B with the shipped French vector."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers loads GGUF files only with it

from alignez_local.align.steering import Steering  # noqa: E402
from alignez_local.formats.control_vector import ControlVector  # noqa: E402
from alignez_local.formats.engines import ENGINES, write_for_engine  # noqa: E402
from alignez_local.llama.engine import Engine  # noqa: E402
from alignez_local.testing.hf_steering import load_hf, steered, streams  # noqa: E402

TEXTS = ["the cat is in the house", "you and the dog"]


@pytest.fixture(scope="module")
def hf_model(tiny_model_path: Path):
    return load_hf(tiny_model_path)


def _tools() -> list[str]:
    have_st = importlib.util.find_spec("safetensors") is not None  # the engines extra
    return [t for t in ENGINES if t != "steering-vectors" or have_st]


def test_every_tool_file_moves_transformers_as_llama_cpp(tiny_engine: Engine, hf_model, tmp_path: Path) -> None:
    prompts = [tiny_engine.prompt(t) for t in TEXTS]
    layers = list(range(tiny_engine.n_layer))
    ids = [tiny_engine.tokenize(p) for p in prompts]
    rng = np.random.default_rng(3)
    plain_hf = np.stack([streams(hf_model, t) for t in ids])
    scale = 0.5 * float(np.linalg.norm(plain_hf[:, 1, 0], axis=-1).mean())  # half the stream's norm at layer 1
    cv = ControlVector(directions={L: rng.normal(size=tiny_engine.n_embd).astype(np.float32) for L in (1, 2)},
                       metadata={"alignez.model.n_layer": tiny_engine.n_layer}, name="t", default_strength=0.5)
    cv = ControlVector(directions={L: d / np.linalg.norm(d) * scale for L, d in cv.directions.items()},
                       metadata=dict(cv.metadata), name="t", default_strength=0.5)

    def llama(steering: Steering | None) -> np.ndarray:
        def read() -> np.ndarray:
            return np.stack([tiny_engine.capture(prompts, layers, site="l_out", reduce=r) for r in ("last", "mean")], 2)
        if steering is None:
            return read()
        with steering.applied(tiny_engine, prompts):
            return read()

    d_ll = llama(Steering.vector(cv, 0.5)) - llama(None)
    assert np.allclose(d_ll[:, 0], 0)  # layer 0 is never steered
    for tool in [*_tools(), "ibm-as-output"]:
        done = write_for_engine(cv, "ibm" if tool == "ibm-as-output" else tool,
                                tmp_path / f"v-{tool}{ENGINES['ibm' if tool == 'ibm-as-output' else tool].suffix}")
        with steered(hf_model, tool, done.path, done.scale):
            d_hf = np.stack([streams(hf_model, t) for t in ids]) - plain_hf
        err = np.linalg.norm(d_hf - d_ll, axis=-1) / np.linalg.norm(d_ll, axis=-1).clip(1e-30)
        if tool == "ibm-as-output":  # one block late: at layer 1 transformers has not moved at all
            assert err[:, 1].min() > 0.99, err
        else:  # the unsteered streams differ by under 1e-3 (llama.cpp's kernels); the changes agree to 1e-2
            assert err[:, 1:].max() < 1e-2, (tool, err)

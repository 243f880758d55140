"""Capture and steering are right on qwen2's graph, checked against plain llama.cpp.

The reference here is written against llama_cpp's low-level API and ggml directly, sharing no
code with alignez_local.llama: its own context with its own eval callback that copies every row
of the named nodes, one prompt per decode, and llama_set_adapter_cvec called by hand. Our Engine
batches prompts, copies only the rows it needs and adds control vectors itself; if any of that
picks the wrong row, layer or buffer offset on qwen2, these tests see it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import llama_cpp
import llama_cpp.llama_cpp as C

from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine
from alignez_local.models import resolve_model

pytestmark = pytest.mark.slow

QWEN = "qwen2.5-coder-0.5b-instruct"
# Two prompts: the first and the second batch slot (the second is where batching shows, see below).
PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]

_ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_nbytes.restype = ctypes.c_size_t
_ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_tensor_get.restype = None
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_NE_OFFSET = 16  # struct ggml_tensor: int32 type, pointer buffer, then int64 ne[4] (x86-64 and arm64)


class PlainLlama:
    """One llama.cpp context, one sequence, an eval callback that keeps whole F32 nodes by name."""

    def __init__(self, path: Path, n_ctx: int = 512) -> None:
        self.model = C.llama_model_load_from_file(str(path).encode(), C.llama_model_default_params())
        assert self.model
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_embd = C.llama_model_n_embd(self.model)
        self.n_layer = C.llama_model_n_layer(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.wanted: set[bytes] = set()
        self.seen: dict[str, np.ndarray] = {}
        self._cb = C.ggml_backend_sched_eval_callback(self._on_node)  # kept alive with the context
        cp = C.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = 0  # as the Engine: flash attention rounds differently per batch shape
        cp.cb_eval = self._cb
        self.ctx = C.llama_init_from_model(self.model, cp)
        assert self.ctx
        self.batch = C.llama_batch_init(n_ctx, 0, 1)

    def _on_node(self, t: int, ask: bool, _user: int) -> bool:
        name = _ggml.ggml_get_name(t)
        if ask:
            return name in self.wanted
        ne = (ctypes.c_int64 * 4).from_address(t + _NE_OFFSET)
        nbytes = _ggml.ggml_nbytes(t)
        assert nbytes == ne[0] * ne[1] * 4, f"{name!r} is not a 2-D F32 node"
        out = np.empty((ne[1], ne[0]), dtype=np.float32)
        _ggml.ggml_backend_tensor_get(t, out.ctypes.data, 0, nbytes)
        self.seen[name.decode()] = out
        return True

    def run(self, tokens: list[int], nodes: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Decode ``tokens`` from an empty cache with every token an output; return the nodes' rows
        (tokens x n_embd) and the logits of the last token."""
        self.wanted, self.seen = {n.encode() for n in nodes}, {}
        C.llama_memory_clear(C.llama_get_memory(self.ctx), True)
        b = self.batch
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, i, 1, 0, 1
        b.n_tokens = len(tokens)
        assert C.llama_decode(self.ctx, b) == 0
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()
        assert set(self.seen) == set(nodes)
        return self.seen, logits

    def set_cvec(self, vectors: dict[int, np.ndarray] | None) -> None:
        """llama_set_adapter_cvec as llama.h documents it: n_embd x n_layer floats from layer 1."""
        if not vectors:
            assert C.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, -1, -1) == 0
            return
        buf = np.zeros((self.n_layer, self.n_embd), dtype=np.float32)
        for layer, v in vectors.items():
            buf[layer - 1] = v
        self._cvec_buf = buf  # llama.cpp copies it, but keep it alive until the call returns anyway
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert C.llama_set_adapter_cvec(self.ctx, ptr, buf.size, self.n_embd, 1, self.n_layer) == 0

    def close(self) -> None:
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        C.llama_model_free(self.model)


@pytest.fixture(scope="module")
def qwen_path() -> Path:
    try:
        return resolve_model(QWEN)
    except AlignezError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def qwen_engine(qwen_path: Path) -> Iterator[Engine]:
    e = Engine(qwen_path, n_ctx=2048, n_threads=2)
    yield e
    e.close()


@pytest.fixture(scope="module")
def plain(qwen_path: Path, qwen_engine: Engine) -> Iterator[PlainLlama]:
    p = PlainLlama(qwen_path)
    yield p
    p.close()


def _close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> bool:
    """Same up to float rounding, relative to the node's scale (qwen2's residual has outliers in
    the hundreds, so one absolute tolerance would be either too loose or too tight)."""
    return float(np.abs(ours - ref).max()) <= rel * float(np.abs(ref).max())


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_model_is_qwen2(qwen_engine: Engine) -> None:
    e = qwen_engine
    assert (e.arch, e.n_layer, e.n_embd) == ("qwen2", 24, 896)
    assert e.is_chat and "<|im_start|>assistant" in e.prompt("hi")


@pytest.mark.parametrize("site", ["l_out", "ffn_out"])
def test_capture_matches_a_plain_eval_callback(site: str, qwen_engine: Engine, plain: PlainLlama) -> None:
    e = qwen_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    layers = list(range(e.n_layer))  # the last layer included: its rows exist only for output tokens
    batch_last = e.capture(prompts, layers, site=site)
    batch_mean = e.capture(prompts, layers, site=site, reduce="mean")
    for i, prompt in enumerate(prompts):
        rows, _ = plain.run(e.tokenize(prompt), [f"{site}-{layer}" for layer in layers])
        ref = np.stack([rows[f"{site}-{layer}"] for layer in layers])  # layers x tokens x n_embd
        assert ref.shape == (e.n_layer, len(e.tokenize(prompt)), e.n_embd)
        # Alone, the prompt is decoded exactly as the plain context decodes it: same rows.
        last = e.capture([prompt], layers, site=site)[0]
        mean = e.capture([prompt], layers, site=site, reduce="mean")[0]
        for layer in layers:
            assert _close(last[layer], ref[layer, -1]), f"{site}-{layer}, prompt {i}: last-token row differs"
            assert _close(mean[layer], ref[layer].mean(axis=0)), f"{site}-{layer}, prompt {i}: mean differs"
        # The row before the last is far off: the comparison can tell rows apart.
        assert (_cos(ref[:, -2], ref[:, -1]) < 0.99).all()
        # In a batch, a prompt in the second slot is rounded differently (measured: from layer 2-4
        # on, cosine >= 0.9992, max element 0.8% of l_out's scale), so compare directions there.
        assert (_cos(batch_last[i], ref[:, -1]) > 0.999).all(), f"{site}, prompt {i} in a batch"
        assert (_cos(batch_mean[i], ref.mean(axis=1)) > 0.999).all(), f"{site}, prompt {i} in a batch (mean)"


def test_control_vector_equals_llama_set_adapter_cvec(qwen_engine: Engine, plain: PlainLlama) -> None:
    e = qwen_engine
    prompt = e.prompt(PROMPTS[0])
    toks = e.tokenize(prompt)
    layer = 12
    v = np.random.default_rng(0).standard_normal(e.n_embd).astype(np.float32) * 4
    nodes = [f"l_out-{layer - 1}", f"l_out-{layer}"]
    base_rows, base_logits = plain.run(toks, nodes)
    plain.set_cvec({layer: v})
    try:
        ref_rows, ref_logits = plain.run(toks, nodes)
    finally:
        plain.set_cvec(None)
    # llama.cpp itself: direction.N lands on l_out-N and on no earlier layer.
    np.testing.assert_array_equal(ref_rows[nodes[0]], base_rows[nodes[0]])
    np.testing.assert_allclose(ref_rows[nodes[1]] - base_rows[nodes[1]], np.broadcast_to(v, base_rows[nodes[1]].shape), atol=1e-3)
    assert np.abs(ref_logits - base_logits).max() > 0.1, "the vector must change the logits"

    with e.control_vector({layer: v}):
        ours_logits = e.next_token_logits([prompt])[0]
        ours_rows = e.capture([prompt], [layer - 1, layer], site="l_out")[0]
    assert _close(ours_logits, ref_logits)
    assert _close(ours_rows[0], ref_rows[nodes[0]][-1]) and _close(ours_rows[1], ref_rows[nodes[1]][-1])


def test_edit_hook_on_l_out_equals_the_control_vector(qwen_engine: Engine, plain: PlainLlama, monkeypatch: pytest.MonkeyPatch) -> None:
    e = qwen_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    layer = 7
    v = np.random.default_rng(1).standard_normal(e.n_embd).astype(np.float32) * 4
    # A shared prompt prefix is decoded once for the control vector (global) but not under an
    # every-token edit hook (its rows belong to no request), and on quantized models the batch shape
    # moves the logits: compare like shapes with like.
    monkeypatch.setattr(e, "share_prefix", False)
    base = e.next_token_logits(prompts)
    with e.control_vector({layer: v}):
        via_cvec = e.next_token_logits(prompts)
    with e.activation_edit(lambda _l, x, _k: x + v, [layer], site="l_out", all_tokens=True):
        via_hook = e.next_token_logits(prompts)
    assert np.abs(via_cvec - base).max() > 0.1, "the vector must change the logits"
    np.testing.assert_array_equal(via_cvec, via_hook)
    # and both equal plain llama.cpp with direction.N = v (first batch slot: decoded as alone)
    plain.set_cvec({layer: v})
    try:
        _, ref = plain.run(e.tokenize(prompts[0]), [])
    finally:
        plain.set_cvec(None)
    assert _close(via_hook[0], ref)

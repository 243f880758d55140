"""The llama.cpp engine: the only module that imports ``llama_cpp``.

It gives the rest of the package four things on any GGUF model:
- ``generate``: many prompts at once as parallel sequences in one llama.cpp batch (continuous
  batching: a new prompt takes the slot of a finished one), greedy or sampled, streaming;
- ``capture``: hidden states (``l_out-N`` residual stream, ``ffn_out-N`` MLP output, ...) read
  inside the forward pass through the scheduler's eval callback, as float32 numpy arrays;
- ``control_vector``: an additive vector per layer through ``llama_set_adapter_cvec``;
- ``activation_edit``: an input-dependent edit ``f(layer, x, keys) -> x`` written back into the
  graph from the same eval callback (this is how the exact AlignEZ rule runs inside llama.cpp).

Design notes (the why):
- llama-cpp-python's high-level ``Llama`` builds its context itself and cannot take an eval
  callback, so the context is made with the low-level API.
- The eval callback is asked about EVERY node of every decode; it answers from one dict lookup on
  the node name and says yes only to the nodes some capture or edit needs, because each yes
  splits the graph. Declining costs nothing measurable (8 sequences x 48 tokens on SmolLM2:
  1.674 s with the callback declining every node, 1.669 s on a context without it).
- ``n_ubatch == n_batch`` and a unified KV cache: every ``llama_decode`` is one ubatch whose rows
  are the batch's tokens in order, so a row of a captured tensor maps back to (sequence, token)
  without guessing. The last layer's tensors hold only the rows of output tokens (llama.cpp
  drops the others before the last layer), which the row mapping handles.
- Tensors are copied with ``ggml_backend_tensor_get/set`` (never ``tensor->data``) so GPU builds
  work, and only the rows needed are copied.
- Every run starts from an empty KV cache and every change of steering clears it, so nothing
  computed under other settings is ever reused.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import llama_cpp.llama_cpp as C
from llama_cpp._ctypes_extensions import load_shared_library

from alignez_local.errors import AlignezError

SITES = ("ffn_out", "l_out", "attn_out")

# --- ggml access -----------------------------------------------------------------------------

_ggml = load_shared_library("ggml-base", Path(C.__file__).parent / "lib")
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_get.restype = None
_ggml.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_set.restype = None
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_nelements.argtypes = [ctypes.c_void_p]
_ggml.ggml_nelements.restype = ctypes.c_int64
_ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
_ggml.ggml_is_contiguous.restype = ctypes.c_bool

# struct ggml_tensor field offsets on LP64 (ggml.h): read directly in the hot "ask" path because
# a ctypes call per node costs more than a memory read. Checked against ggml's own accessors on
# the first node of every engine (``_check_layout``).
_T_TYPE, _T_NE, _T_NAME = 0, 16, 256
_GGML_TYPE_F32 = 0


def _tensor_rows(t: int) -> tuple[int, int]:
    ne = (ctypes.c_int64 * 2).from_address(t + _T_NE)
    return int(ne[0]), int(ne[1])


# --- logging ---------------------------------------------------------------------------------

_log_lock = threading.Lock()
_recent_log: deque[str] = deque(maxlen=20)
_verbose = False


@C.llama_log_callback
def _log_sink(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # Keep llama.cpp quiet by default but remember the last lines: they explain load failures.
    msg = text.decode("utf-8", "replace") if text else ""
    _recent_log.append(msg)
    if _verbose:
        print(msg, end="", file=__import__("sys").stderr, flush=True)


_backend_ready = False


def _init_backend(verbose: bool) -> None:
    global _backend_ready, _verbose
    _verbose = verbose
    with _log_lock:
        if not _backend_ready:
            C.llama_log_set(_log_sink, ctypes.c_void_p(0))
            C.llama_backend_init()
            _backend_ready = True


def physical_cores() -> int:
    """Return the number of physical CPU cores (the good default thread count for llama.cpp)."""
    try:
        seen = set()
        phys = core = None
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    seen.add((phys, core))
        if seen:
            return max(1, min(len(seen), len(os.sched_getaffinity(0))))
    except (OSError, AttributeError, IndexError):
        pass
    return max(1, (os.cpu_count() or 2) // 2)


# --- public value types ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every command that generates text."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    max_tokens: int = 128
    repeat_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()

    def check(self) -> "Sampling":
        """Return self after checking every value is in range (AlignezError otherwise)."""
        if not (0.0 <= self.temperature <= 5.0):
            raise AlignezError(f"--temperature {self.temperature} is out of range; use 0 (greedy) to 5")
        if not (0.0 < self.top_p <= 1.0):
            raise AlignezError(f"--top-p {self.top_p} is out of range; use a value in (0, 1]")
        if self.top_k < 0:
            raise AlignezError(f"--top-k {self.top_k} is negative; use 0 (off) or a positive count")
        if not (0 <= self.seed < 2**32 - 1):
            raise AlignezError(f"--seed {self.seed} is out of range; use 0 to {2**32 - 2}")
        if not (1 <= self.max_tokens <= 32768):
            raise AlignezError(f"--max-tokens {self.max_tokens} is out of range; use 1 to 32768")
        if not (0.5 <= self.repeat_penalty <= 3.0):
            raise AlignezError(f"--repeat-penalty {self.repeat_penalty} is out of range; use 0.5 to 3")
        return self


@dataclass
class Completion:
    """One generated answer."""

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOG token or stop string), "length", "interrupted"
    n_prompt_tokens: int


# An edit receives (layer, rows of the node at the output positions, the caller's key of each
# row's sequence) and returns new rows (or None to leave them).
EditFn = Callable[[int, np.ndarray, Sequence[int]], "np.ndarray | None"]
TokenFn = Callable[[int, str], None]


@dataclass
class _Edit:
    fn: EditFn
    site: str
    layers: frozenset[int]
    all_tokens: bool


@dataclass
class _Seq:
    """One sequence in flight: its prompt, where it is, and what to do with its outputs."""

    key: int
    tokens: list[int]
    sampling: Sampling | None = None  # None: prefill only (capture, logits)
    output_from: int | None = None  # mark prompt tokens >= this as outputs (None: last only)
    slot: int = -1
    fed: int = 0
    pending: int | None = None
    sampler: Any = None
    generated: list[int] = field(default_factory=list)
    decoder: Any = None
    text: str = ""
    emitted: int = 0
    finish: str | None = None


@dataclass
class _Layout:
    """Where each sequence's tokens and outputs sit in the batch being decoded (for the callback)."""

    n_tokens: int
    out_rows: np.ndarray  # batch row of each output, in output order
    out_keys: list[int]  # caller key of each output
    tok_keys: list[int]  # caller key of each batch row
    out_last: list[bool]  # is this output the last prompt token of a capture sequence
    spans: list[tuple[_Seq, int, int, int]]  # (seq, first batch row, n rows, token index of first)


class _Capture:
    """Accumulates the rows a capture needs, one small copy per node and sequence."""

    def __init__(self, n_texts: int, layers: Sequence[int], n_embd: int, reduce: str, mean_from: Sequence[int] | None):
        self.col = {layer: i for i, layer in enumerate(layers)}
        self.out = np.zeros((n_texts, len(layers), n_embd), dtype=np.float32)
        self.reduce = reduce
        self.mean_from = mean_from
        self.counts = np.zeros(n_texts, dtype=np.int64)


class Engine:
    """A loaded GGUF model with a context that can generate, capture and steer."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_parallel: int = 8,
        n_batch: int = 512,
        flash_attn: bool = False,
        verbose: bool = False,
    ) -> None:
        _init_backend(verbose)
        self.path = Path(model_path)
        if not (1 <= n_parallel <= 64):
            raise AlignezError(f"--parallel {n_parallel} is out of range; use 1 to 64")
        if not (64 <= n_ctx <= 1 << 20):
            raise AlignezError(f"--ctx {n_ctx} is out of range; use 64 to 1048576")
        self.n_threads = n_threads or physical_cores()
        self.n_parallel = n_parallel
        self.n_batch = n_batch

        mp = C.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        _recent_log.clear()
        model = C.llama_model_load_from_file(str(self.path).encode(), mp)
        if not model:
            why = next((ln.strip() for ln in reversed(_recent_log) if "error" in ln.lower()), "")
            raise AlignezError(
                f"llama.cpp could not load {self.path}{': ' + why if why else ''}; "
                "check it is a complete GGUF model for this llama.cpp version"
            )
        self._model = model
        self._vocab = C.llama_model_get_vocab(model)
        self.n_layer = int(C.llama_model_n_layer(model))
        self.n_embd = int(C.llama_model_n_embd(model))
        self.n_vocab = int(C.llama_vocab_n_tokens(self._vocab))
        self.arch = self.meta("general.architecture") or "unknown"
        self.name = self.meta("general.name") or self.path.stem
        tmpl = C.llama_model_chat_template(model, None)
        self.chat_template: str | None = tmpl.decode("utf-8", "replace") if tmpl else None
        self._add_bos = bool(C.llama_vocab_get_add_bos(self._vocab))
        self._bos_text = self._piece(C.llama_vocab_bos(self._vocab), special=True) if self._add_bos else ""

        # Steering and capture state read by the eval callback.
        self._wanted: dict[bytes, tuple[int, str]] = {}
        self._edits: list[_Edit] = []
        self._cvecs: list[Mapping[int, np.ndarray]] = []
        self._capture: _Capture | None = None
        self._capture_site = "ffn_out"
        self._layout: _Layout | None = None
        self._cb_error: BaseException | None = None
        self._abort = False
        self._layout_checked = False

        self._flash_attn = flash_attn
        self._requested_ctx = n_ctx
        self._cb = C.ggml_backend_sched_eval_callback(self._on_node)
        self._interrupted = False
        self._abort_cb = C.ggml_abort_callback(self._should_abort)
        self._ctx: Any = None
        try:
            self._make_context()
        except AlignezError:
            C.llama_model_free(model)
            raise
        self.n_ctx = int(C.llama_n_ctx(self._ctx))
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    def _make_context(self) -> None:
        """Create the llama.cpp context (the eval callback is read only here, at creation)."""
        cp = C.llama_context_default_params()
        cp.n_ctx = self._requested_ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_batch  # one ubatch per decode: captured rows map to batch tokens 1:1
        cp.n_seq_max = self.n_parallel
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        cp.kv_unified = True  # parallel sequences share the whole context, in batch order
        cp.no_perf = True
        # Flash attention on the CPU rounds through F16 in a way that depends on the batch shape
        # (measured: 3% differences in l_out between a prompt decoded alone and beside others);
        # off by default so a prompt's result does not depend on its neighbours in the batch.
        cp.flash_attn_type = 1 if self._flash_attn else 0
        cp.cb_eval = self._cb
        cp.abort_callback = self._abort_cb
        ctx = C.llama_init_from_model(self._model, cp)
        if not ctx:
            raise AlignezError(
                f"llama.cpp could not create a context of {self._requested_ctx} tokens for {self.path}; try a smaller --ctx"
            )
        self._ctx = ctx
        self._mem = C.llama_get_memory(ctx)

    def close(self) -> None:
        """Free the context and the model (also done when the engine is garbage collected)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        C.llama_batch_free(self._batch)
        if self._ctx is not None:
            C.llama_free(self._ctx)
            self._ctx = None
        C.llama_model_free(self._model)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- model facts and text ----------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """Return a GGUF metadata value of the model as a string, or None."""
        buf = ctypes.create_string_buffer(1024)
        n = C.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def is_chat(self) -> bool:
        """True when the model carries a chat template (an instruct model)."""
        return self.chat_template is not None

    @property
    def default_stop(self) -> tuple[str, ...]:
        """Stop strings the plain base-model format needs (none for chat-template models)."""
        return () if self.is_chat else ("\nUser:", "\nQuestion:")

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Return the token ids of ``text``, special tokens parsed, BOS added when the model wants it."""
        data = text.encode("utf-8")
        add = add_bos and self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self._vocab, data, len(data), buf, n_max, add, True)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, n_max, add, True)
        return list(buf[:n])

    def _piece(self, token: int, special: bool = False) -> str:
        return self._piece_bytes(token, special).decode("utf-8", "replace")

    def _piece_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Return the text of ``tokens`` (special tokens left out)."""
        return b"".join(self._piece_bytes(t) for t in tokens).decode("utf-8", "replace")

    def format_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Return the prompt text for a conversation: the GGUF's own chat template for chat models,
        the plain format below for base models.

        Plain format (base models): an optional system text and a blank line, then one line per
        turn, ``User: ...`` and ``Assistant: ...``, ending with ``Assistant:`` when a reply is wanted;
        generation stops at ``\\nUser:`` (``default_stop``).
        """
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise AlignezError("a chat message needs a role (system, user or assistant) and text content")
        if self.chat_template is None:
            parts: list[str] = []
            for m in messages:
                if m["role"] == "system":
                    parts.append(m["content"].strip() + "\n\n")
                else:
                    who = "User" if m["role"] == "user" else "Assistant"
                    parts.append(f"{who}: {m['content'].strip()}\n")
            if add_generation_prompt:
                parts.append("Assistant:")
            return "".join(parts)
        return self._render_template(list(messages), add_generation_prompt)

    def _render_template(self, messages: list[Mapping[str, str]], add_generation_prompt: bool) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        eos = self._piece(C.llama_vocab_eos(self._vocab), special=True)
        try:
            tmpl = env.from_string(self.chat_template or "")
            return tmpl.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self._bos_text, eos_token=eos
            )
        except jinja2.TemplateError as err:
            # Some templates (Gemma's, for one) refuse a system role: fold it into the first user turn.
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                return self._render_template(merged + list(messages[2:]), add_generation_prompt)
            raise AlignezError(f"the model's chat template failed: {err}") from None

    def prompt(self, user: str, system: str | None = None) -> str:
        """Return the prompt text for one user message (and an optional system prompt)."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.format_chat(msgs)

    # --- the eval callback -------------------------------------------------------------------

    def _on_node(self, t: int, ask: bool, _user: int) -> bool:
        try:
            if ask:
                # Hot path: runs for every node of every decode.
                return bool(self._wanted) and ctypes.string_at(t + _T_NAME) in self._wanted
            want = self._wanted.get(ctypes.string_at(t + _T_NAME))
            if want is not None:
                self._handle_node(t, *want)
            return True
        except BaseException as err:  # noqa: BLE001 - an exception must not cross into C
            self._cb_error = err
            self._abort = True
            return True

    def _should_abort(self, _data: int) -> bool:
        return self._abort

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Turn Ctrl-C during a decode into a clean abort, then a KeyboardInterrupt after it.

        Without this the interrupt would surface inside a ctypes callback, where Python can only
        print it and carry on.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(_signum: int, _frame: object) -> None:
            self._interrupted = True
            self._abort = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _check_layout(self, t: int) -> None:
        name = _ggml.ggml_get_name(t)
        ne0, ne1 = _tensor_rows(t)
        if name != ctypes.string_at(t + _T_NAME) or _ggml.ggml_nelements(t) != ne0 * ne1:
            raise AlignezError("this llama.cpp build has an unexpected ggml_tensor layout; capture and edits are unsupported")
        self._layout_checked = True

    def _handle_node(self, t: int, layer: int, site: str) -> None:
        if not self._layout_checked:
            self._check_layout(t)
        lay = self._layout
        if lay is None:
            return
        ne0, ne1 = _tensor_rows(t)
        if ne0 != self.n_embd or int(ctypes.c_int32.from_address(t + _T_TYPE).value) != _GGML_TYPE_F32:
            raise AlignezError(f"node {site}-{layer} is not an F32 [n_embd x tokens] tensor in this model")
        if not _ggml.ggml_is_contiguous(t):
            raise AlignezError(f"node {site}-{layer} is not contiguous in this model")
        n_out = len(lay.out_rows)
        # The last layer keeps only the output rows (llama.cpp drops the rest before it).
        by_output = ne1 != lay.n_tokens and ne1 == n_out
        if ne1 != lay.n_tokens and not by_output:
            raise AlignezError(f"node {site}-{layer} has {ne1} rows for a batch of {lay.n_tokens} tokens")
        row_bytes = ne0 * 4

        for e in self._edits:
            if e.site == site and layer in e.layers and n_out:
                if e.all_tokens and not by_output:
                    rows, keys = np.arange(ne1), lay.tok_keys
                else:
                    rows, keys = (np.arange(n_out) if by_output else lay.out_rows), lay.out_keys
                x = _get_rows(t, rows, ne0)
                y = e.fn(layer, x, keys)
                if y is not None:
                    y = np.ascontiguousarray(y, dtype=np.float32)
                    if y.shape != x.shape or not np.all(np.isfinite(y)):
                        raise AlignezError(f"an activation edit returned a bad array at {site}-{layer}")
                    _set_rows(t, rows, y)

        cap = self._capture
        if cap is not None and site == self._capture_site and layer in cap.col:
            col = cap.col[layer]
            if cap.reduce == "last":
                for i, (key, is_last) in enumerate(zip(lay.out_keys, lay.out_last)):
                    if is_last:
                        r = i if by_output else int(lay.out_rows[i])
                        buf = cap.out[key, col]
                        _ggml.ggml_backend_tensor_get(t, buf.ctypes.data, r * row_bytes, row_bytes)
            else:
                for seq, row0, n, tok0 in lay.spans:
                    start = cap.mean_from[seq.key] if cap.mean_from is not None else 0
                    lo = max(tok0, start)
                    if lo >= tok0 + n:
                        continue
                    if by_output:
                        # All mean-span tokens are outputs; their output rows are consecutive.
                        first_out = int(np.searchsorted(lay.out_rows, row0 + (lo - tok0)))
                        rows = np.arange(first_out, first_out + (tok0 + n - lo))
                    else:
                        rows = np.arange(row0 + (lo - tok0), row0 + n)
                    cap.out[seq.key, col] += _get_rows(t, rows, ne0).sum(axis=0)
                    if col == 0:
                        cap.counts[seq.key] += len(rows)

    # --- the batch scheduler -----------------------------------------------------------------

    def _run(self, seqs: list[_Seq], on_token: TokenFn | None = None, on_logits: Callable[[_Seq, int, int], None] | None = None, on_done: Callable[[_Seq], None] | None = None) -> None:
        """Decode ``seqs`` as parallel sequences until every one is finished."""
        for s in seqs:
            need = len(s.tokens) + (s.sampling.max_tokens if s.sampling else 0)
            if need > self.n_ctx:
                raise AlignezError(
                    f"a prompt of {len(s.tokens)} tokens (+{need - len(s.tokens)} to generate) does not fit "
                    f"the context of {self.n_ctx}; shorten it or raise --ctx"
                )
            if not s.tokens:
                raise AlignezError("an empty prompt cannot be decoded; give some text")
        C.llama_memory_clear(self._mem, True)
        queue = deque(seqs)
        free = list(range(self.n_parallel))
        active: list[_Seq] = []
        batch = self._batch
        self._abort = False
        self._interrupted = False
        self._cb_error = None
        try:
            with self._interruptible():
                while queue or active:
                    while queue and free:
                        s = queue.popleft()
                        s.slot = free.pop(0)
                        if s.sampling is not None:
                            s.sampler = self._make_sampler(s.sampling)
                            s.decoder = codecs.getincrementaldecoder("utf-8")("replace")
                        active.append(s)
                    n = 0
                    out_rows: list[int] = []
                    out_keys: list[int] = []
                    tok_keys: list[int] = []
                    out_last: list[bool] = []
                    out_seq: list[_Seq] = []
                    out_tok: list[int] = []
                    spans: list[tuple[_Seq, int, int, int]] = []

                    def put(s: _Seq, tok: int, pos: int, output: bool) -> None:
                        nonlocal n
                        batch.token[n] = tok
                        batch.pos[n] = pos
                        batch.n_seq_id[n] = 1
                        batch.seq_id[n][0] = s.slot
                        batch.logits[n] = output
                        tok_keys.append(s.key)
                        if output:
                            out_rows.append(n)
                            out_keys.append(s.key)
                            out_last.append(s.sampling is None and pos == len(s.tokens) - 1)
                            out_seq.append(s)
                            out_tok.append(pos)
                        n += 1

                    # Sequences that are generating go first (one token each), prompts fill the rest.
                    for s in active:
                        if s.pending is not None:
                            spans.append((s, n, 1, s.fed))
                            put(s, s.pending, s.fed, True)
                            s.fed += 1
                            s.pending = None
                    for s in active:
                        if s.fed < len(s.tokens) and n < self.n_batch:
                            take = min(len(s.tokens) - s.fed, self.n_batch - n)
                            spans.append((s, n, take, s.fed))
                            last = len(s.tokens) - 1
                            for p in range(s.fed, s.fed + take):
                                out = p == last or (s.output_from is not None and p >= s.output_from)
                                put(s, s.tokens[p], p, out)
                            s.fed += take
                    batch.n_tokens = n
                    self._layout = _Layout(n, np.asarray(out_rows, dtype=np.int64), out_keys, tok_keys, out_last, spans)
                    rc = C.llama_decode(self._ctx, batch)
                    if self._interrupted:
                        raise KeyboardInterrupt
                    if self._cb_error is not None:
                        raise self._cb_error
                    if rc == 1:
                        raise AlignezError(
                            f"the context of {self.n_ctx} tokens is full with {len(active)} parallel sequences; "
                            "raise --ctx or lower --parallel"
                        )
                    if rc != 0:
                        raise AlignezError(f"llama_decode failed with code {rc}")

                    for i, s in enumerate(out_seq):
                        if on_logits is not None:
                            on_logits(s, out_tok[i], out_rows[i])
                        if s.sampling is not None and s.fed == len(s.tokens) + len(s.generated) and s.finish is None:
                            self._sample_next(s, out_rows[i], on_token)
                    for s in list(active):
                        prefilled = s.fed >= len(s.tokens)
                        if (s.sampling is None and prefilled) or s.finish is not None:
                            active.remove(s)
                            C.llama_memory_seq_rm(self._mem, s.slot, -1, -1)
                            free.append(s.slot)
                            free.sort()
                            self._free_sampler(s)
                            if on_done is not None:
                                on_done(s)
        except KeyboardInterrupt:
            for s in active:
                if s.sampling is not None and s.finish is None:
                    s.finish = "interrupted"
            raise
        finally:
            for s in active:
                self._free_sampler(s)
            self._layout = None
            self._abort = False
            C.llama_memory_clear(self._mem, True)

    def _make_sampler(self, sp: Sampling) -> Any:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if sp.repeat_penalty != 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(self.n_vocab, 64, sp.repeat_penalty, 0.0, 0.0))
        if sp.temperature <= 0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        else:
            if sp.top_k > 0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(sp.top_k))
            if sp.top_p < 1.0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(sp.top_p, 1))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(sp.temperature))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(sp.seed))
        return chain

    @staticmethod
    def _free_sampler(s: _Seq) -> None:
        if s.sampler is not None:
            C.llama_sampler_free(s.sampler)
            s.sampler = None

    def _sample_next(self, s: _Seq, row: int, on_token: TokenFn | None) -> None:
        sp = s.sampling
        assert sp is not None
        tok = int(C.llama_sampler_sample(s.sampler, self._ctx, row))
        if C.llama_vocab_is_eog(self._vocab, tok):
            s.finish = "stop"
        else:
            s.generated.append(tok)
            s.text += s.decoder.decode(self._piece_bytes(tok))
            stops = sp.stop
            cut = min((i for i in (s.text.find(x, max(0, s.emitted - len(x))) for x in stops) if i >= 0), default=-1)
            if cut >= 0:
                s.text = s.text[:cut]
                s.finish = "stop"
            elif len(s.generated) >= sp.max_tokens:
                s.finish = "length"
            else:
                s.pending = tok
        if s.finish is not None:
            s.text += s.decoder.decode(b"", final=True) if s.finish == "length" else ""
        # Hold back text that may be the start of a stop string until it is decided.
        hold = 0 if s.finish is not None else max((len(x) - 1 for x in sp.stop), default=0)
        upto = max(s.emitted, len(s.text) - hold)
        if on_token is not None and upto > s.emitted:
            on_token(s.key, s.text[s.emitted : upto])
        s.emitted = upto

    # --- public operations -------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        on_token: TokenFn | None = None,
    ) -> list[Completion]:
        """Return one completion per prompt, decoded as parallel sequences in shared batches.

        ``sampling`` is one setting for all prompts or one per prompt (e.g. different seeds).
        ``on_token(i, text)`` streams new text of prompt i as it is decided. Each sequence has its
        own sampler, so a prompt's output does not depend on which others share the batch.
        """
        sps = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(sps) != len(prompts):
            raise ValueError("one Sampling per prompt, or a single one for all")
        seqs = [_Seq(i, self.tokenize(p), sampling=sp.check()) for i, (p, sp) in enumerate(zip(prompts, sps))]
        self._run(seqs, on_token=on_token)
        return [
            Completion(s.text, len(s.generated), s.finish or "interrupted", len(s.tokens)) for s in seqs
        ]

    def capture(
        self,
        texts: Sequence[str],
        layers: Sequence[int],
        site: str = "ffn_out",
        reduce: str = "last",
        mean_from: Sequence[int] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Return hidden states, float32 (texts x layers x n_embd), read inside the forward pass.

        ``site``: ``ffn_out`` (MLP output), ``l_out`` (residual stream after the layer, where
        control vectors are added) or ``attn_out``. ``reduce``: ``last`` token, or ``mean`` over the
        tokens from ``mean_from[i]`` (token index, default 0) to the end. Only the needed rows are
        copied out of each node, so memory holds one batch of raw tensors at most.
        """
        if site not in SITES:
            raise AlignezError(f"unknown capture site {site!r}; use one of {', '.join(SITES)}")
        if reduce not in ("last", "mean"):
            raise AlignezError(f"unknown reduce {reduce!r}; use last or mean")
        layers = [int(x) for x in layers]
        for layer in layers:
            if not 0 <= layer < self.n_layer:
                raise AlignezError(f"layer {layer} does not exist; this model has layers 0..{self.n_layer - 1}")
        if len(set(layers)) != len(layers):
            raise AlignezError("capture layers must be distinct")
        toks = [self.tokenize(t) for t in texts]
        need_all = reduce == "mean" and (self.n_layer - 1) in layers
        seqs = [
            _Seq(i, tk, output_from=(mean_from[i] if mean_from is not None else 0) if need_all else None)
            for i, tk in enumerate(toks)
        ]
        cap = _Capture(len(texts), layers, self.n_embd, reduce, mean_from)
        done = 0

        def progress(_s: _Seq) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, len(texts))

        self._capture, self._capture_site = cap, site
        self._set_wanted()
        try:
            self._run(seqs, on_done=progress)
        finally:
            self._capture = None
            self._set_wanted()
        if reduce == "mean":
            cap.out /= np.maximum(cap.counts, 1)[:, None, None]
        return cap.out

    def next_token_logits(self, prompts: Sequence[str]) -> np.ndarray:
        """Return the logits (prompts x n_vocab) for the token after each prompt, under current steering."""
        out = np.zeros((len(prompts), self.n_vocab), dtype=np.float32)

        def grab(s: _Seq, pos: int, row: int) -> None:
            out[s.key] = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))

        self._run([_Seq(i, self.tokenize(p)) for i, p in enumerate(prompts)], on_logits=grab)
        return out

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        """Return, per pair, the log-probability of each continuation token given the prompt and the
        tokens before it (for perplexity). The continuation is tokenized after the prompt."""
        seqs: list[_Seq] = []
        targets: list[list[int]] = []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            ptok = self.tokenize(p)
            full = ptok + self.tokenize(c, add_bos=False)
            seqs.append(_Seq(i, full, output_from=len(ptok) - 1))
            targets.append(full)
        res = [np.zeros(max(0, len(t) - len(s.tokens[: s.output_from + 1])), dtype=np.float64) for t, s in zip(targets, seqs)]

        def grab(s: _Seq, pos: int, row: int) -> None:
            if pos + 1 >= len(s.tokens):
                return
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,)).astype(np.float64)
            m = logits.max()
            lse = m + np.log(np.exp(logits - m).sum())
            res[s.key][pos - s.output_from] = logits[s.tokens[pos + 1]] - lse

        self._run(seqs, on_logits=grab)
        return res

    # --- steering ----------------------------------------------------------------------------

    def _set_wanted(self) -> None:
        wanted: dict[bytes, tuple[int, str]] = {}
        for e in self._edits:
            for layer in e.layers:
                wanted[f"{e.site}-{layer}".encode()] = (layer, e.site)
        if self._capture is not None:
            for layer in self._capture.col:
                wanted[f"{self._capture_site}-{layer}".encode()] = (layer, self._capture_site)
        self._wanted = wanted

    def _apply_cvecs(self) -> None:
        if not self._cvecs:
            rc = C.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, -1, -1)
        else:
            buf = np.zeros((self.n_layer - 1) * self.n_embd, dtype=np.float32)
            for vecs in self._cvecs:
                for layer, v in vecs.items():
                    buf[(layer - 1) * self.n_embd : layer * self.n_embd] += v
            # The whole buffer every time: layers a shorter buffer leaves out keep OLD values.
            rc = C.llama_set_adapter_cvec(
                self._ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size, self.n_embd, 1, self.n_layer - 1
            )
        if rc != 0:
            raise AlignezError(f"llama.cpp refused the control vector (code {rc})")
        C.llama_memory_clear(self._mem, True)

    def check_vectors(self, vectors: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Return ``vectors`` as float32 after checking layers and width fit this model."""
        out: dict[int, np.ndarray] = {}
        for layer, v in vectors.items():
            if not 1 <= int(layer) < self.n_layer:
                raise AlignezError(
                    f"a control vector for layer {layer} does not fit: this model takes layers 1..{self.n_layer - 1}"
                )
            a = np.asarray(v, dtype=np.float32).reshape(-1)
            if a.size != self.n_embd:
                raise AlignezError(f"a control vector of width {a.size} does not fit this model (n_embd {self.n_embd})")
            if not np.all(np.isfinite(a)):
                raise AlignezError(f"the control vector for layer {layer} has NaN or infinite values")
            out[int(layer)] = a
        return out

    @contextmanager
    def control_vector(self, vectors: Mapping[int, np.ndarray]) -> Iterator[None]:
        """Add ``vectors[N]`` to the output of layer N (``l_out-N``, N >= 1) inside this block.

        Blocks nest (active vectors are summed). The KV cache is cleared on entry and exit.
        """
        vecs = self.check_vectors(vectors)
        self._cvecs.append(vecs)
        try:
            self._apply_cvecs()
            yield
        finally:
            self._cvecs.remove(vecs)
            self._apply_cvecs()

    @contextmanager
    def activation_edit(
        self, fn: EditFn, layers: Sequence[int], site: str = "ffn_out", all_tokens: bool = False
    ) -> Iterator[None]:
        """Run ``fn(layer, x, keys) -> x'`` on rows of the node ``site-layer`` inside this block.

        By default x holds the rows of the output positions: the last prompt token (prefill) and
        each generated token, one per sequence in the batch (the AlignEZ rule edits these).
        ``all_tokens=True`` edits every token, as a control vector does. keys are the prompt
        indices of the rows. Blocks nest.
        """
        if site not in SITES:
            raise AlignezError(f"unknown edit site {site!r}; use one of {', '.join(SITES)}")
        for layer in layers:
            if not 0 <= int(layer) < self.n_layer:
                raise AlignezError(f"layer {layer} does not exist; this model has layers 0..{self.n_layer - 1}")
        e = _Edit(fn, site, frozenset(int(x) for x in layers), all_tokens)
        self._edits.append(e)
        self._set_wanted()
        C.llama_memory_clear(self._mem, True)
        try:
            yield
        finally:
            self._edits.remove(e)
            self._set_wanted()
            C.llama_memory_clear(self._mem, True)


def _get_rows(t: int, rows: np.ndarray, ne0: int) -> np.ndarray:
    """Copy rows of an F32 [ne0 x rows] tensor into a new (len(rows), ne0) array, in few copies."""
    out = np.empty((len(rows), ne0), dtype=np.float32)
    row_bytes = ne0 * 4
    for a, b, r0 in _runs(rows):
        _ggml.ggml_backend_tensor_get(t, out[a:b].ctypes.data, r0 * row_bytes, (b - a) * row_bytes)
    return out


def _set_rows(t: int, rows: np.ndarray, values: np.ndarray) -> None:
    ne0 = values.shape[1]
    row_bytes = ne0 * 4
    for a, b, r0 in _runs(rows):
        chunk = np.ascontiguousarray(values[a:b])
        _ggml.ggml_backend_tensor_set(t, chunk.ctypes.data, r0 * row_bytes, (b - a) * row_bytes)


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Yield (start, end, first row) for each run of consecutive row indices."""
    n = len(rows)
    a = 0
    while a < n:
        b = a + 1
        while b < n and rows[b] == rows[b - 1] + 1:
            b += 1
        yield a, b, int(rows[a])
        a = b

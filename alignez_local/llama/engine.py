"""The ``Engine`` facade: a loaded GGUF model with one llama.cpp context that can generate,
capture and steer. The ``llama`` package is the only code that imports ``llama_cpp``.

It gives the rest of the package four things on any GGUF model:
- ``generate``: many prompts at once as parallel sequences in one llama.cpp batch (continuous
  batching, ``scheduler.py``), greedy or sampled, streaming;
- ``capture``: hidden states (``l_out-N`` residual stream, ``ffn_out-N`` MLP output, ...) read
  inside the forward pass through the eval callback (``hooks.py``), as float32 numpy arrays;
- ``control_vector``: an additive vector per layer through ``llama_set_adapter_cvec``;
- ``activation_edit``: an input-dependent edit ``f(layer, x, keys) -> x`` written back into the
  graph from the same eval callback (this is how the exact AlignEZ rule runs inside llama.cpp).

Design notes (the why):
- llama-cpp-python's high-level ``Llama`` builds its context itself and cannot take an eval
  callback, so the context is made with the low-level API.
- ``n_ubatch == n_batch`` and a unified KV cache: every ``llama_decode`` is one ubatch whose rows
  are the batch's tokens in order, so a row of a captured tensor maps back to (sequence, token)
  without guessing. The last layer's tensors hold only the rows of output tokens (llama.cpp
  drops the others before the last layer), which the row mapping handles.
- ``rpc_servers``: the layers run on llama.cpp ``rpc-server`` processes (``rpc.py``); capture and
  edits are the same code, reading and writing the remote tensors through ggml's backend calls.
- Every run starts from an empty KV cache and every change of steering clears it, so nothing
  computed under other settings is ever reused.
"""

# size: the Engine facade is the one public surface over llama.cpp (generate, capture, logits,
# control vectors, edits); each method is short and delegates to scheduler/hooks/vocab.

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import llama_cpp.llama_cpp as C

from alignez_local.errors import AlignezError
from alignez_local.llama import bindings, hooks, rpc
from alignez_local.llama.chat_format import PLAIN_STOP, chat_parts, format_chat
from alignez_local.llama.cvec import check_vectors, cvec_buffer
from alignez_local.llama.hooks import Capture, Edit, EditFn, HookState
from alignez_local.llama.sampling import Completion, Sampling, TokenFn, TokenLogprob
from alignez_local.llama.scheduler import CANCELLED, AdmitFn, DecodeCounts, Scheduler, Seq, logsumexp_row
from alignez_local.llama.vocab import Vocab
from alignez_local.specs import CAPTURE_SITES

__all__ = [
    "CANCELLED", "AdmitFn", "Completion", "EditFn", "Engine", "Sampling", "Seq", "TokenFn", "TokenLogprob", "physical_cores",
]

physical_cores = bindings.physical_cores

# n_gpu_layers that puts every layer (and the output layer) on the devices: llama.cpp caps it.
RPC_ALL_LAYERS = 10000


class Engine:
    """A loaded GGUF model with a context that can generate, capture and steer.

    An Engine is single-threaded: one call at a time, from one thread. Its context, batch and
    hook state are shared by every call, so two threads must each open their own Engine.
    """

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
        rpc_servers: Sequence[str] = (),
        repack_weights: bool = True,
    ) -> None:
        self._closed = True  # until the model is loaded: close() then has nothing to free
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        bindings.init_backend(verbose)
        self.path = Path(model_path)
        if not (1 <= n_parallel <= 64):
            raise AlignezError(f"n_parallel {n_parallel} is out of range; use 1 to 64")
        if not (64 <= n_ctx <= 1 << 20):
            raise AlignezError(f"n_ctx {n_ctx} is out of range; use 64 to 1048576")
        self.n_threads = n_threads or physical_cores()
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        # Decode a prompt prefix shared by all texts of a logits run once (False: rule it out, measure it).
        self.share_prefix = True
        # Stop a capture's graph at its deepest captured node (False: compute the whole graph, to measure it).
        self.stop_captures_early = True
        self.rpc_servers = tuple(rpc_servers)
        self.repack_weights = repack_weights
        self._load_model(n_gpu_layers)
        try:
            self._read_model_facts()
            self._hooks = HookState(self.n_embd)
            self._cvecs: list[dict[int, np.ndarray]] = []
            self._graph_vec: dict[int, np.ndarray] | None = None  # set_graph_vector's, inside a running decode
            self._make_context(n_ctx, flash_attn)
        except BaseException:
            self.close()  # the model (and a context, if made) must not leak
            raise

    # --- lifecycle ---------------------------------------------------------------------------

    def _load_model(self, n_gpu_layers: int) -> None:
        mp = C.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        # The CPU backend repacks quantized weights into an interleaved layout for faster matmuls
        # (llama.cpp's "extra buffer types"); an rpc-server holds them plainly, so the sums run in
        # another order: off, a local run computes exactly what the servers compute (rpc_check.py).
        mp.use_extra_bufts = self.repack_weights
        if self.rpc_servers:
            # The servers are the only devices the model goes to, and every layer goes to them
            # unless n_gpu_layers says how many (the rest then stay on this machine's CPU).
            devs = rpc.devices(self.rpc_servers)
            dev_list = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)  # NULL-terminated; llama.cpp copies it
            mp.devices = ctypes.addressof(dev_list)
            mp.n_gpu_layers = n_gpu_layers or RPC_ALL_LAYERS
        bindings.clear_log()
        model = C.llama_model_load_from_file(str(self.path).encode(), mp)
        if not model:
            why = bindings.last_error_line()
            raise AlignezError(
                f"llama.cpp could not load {self.path}{': ' + why if why else ''}; "
                "check it is a complete GGUF model for this llama.cpp version"
            )
        self._model = model
        self._closed = False

    def _read_model_facts(self) -> None:
        model = self._model
        self._vocab = Vocab(model)
        self.n_layer = int(C.llama_model_n_layer(model))
        self.n_embd = int(C.llama_model_n_embd(model))
        self.n_vocab = self._vocab.n_tokens
        self.arch = self.meta("general.architecture") or "unknown"
        self.name = self.meta("general.name") or self.path.stem
        tmpl = C.llama_model_chat_template(model, None)
        self.chat_template: str | None = tmpl.decode("utf-8", "replace") if tmpl else None

    def _make_context(self, n_ctx: int, flash_attn: bool) -> None:
        """Create the llama.cpp context (the eval callback is read only here, at creation)."""
        cp = C.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_batch  # one ubatch per decode: captured rows map to batch tokens 1:1
        cp.n_seq_max = self.n_parallel + 1  # one spare sequence id holds a shared prompt prefix
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        cp.kv_unified = True  # parallel sequences share the whole context, in batch order
        cp.no_perf = True
        # Flash attention on the CPU rounds through F16 in a way that depends on the batch shape
        # (measured: 3% differences in l_out between a prompt decoded alone and beside others);
        # off by default so a prompt's result does not depend on its neighbours in the batch.
        cp.flash_attn_type = 1 if flash_attn else 0
        handle = hooks.register(self._hooks)
        cp.cb_eval = hooks.eval_callback
        cp.cb_eval_user_data = ctypes.c_void_p(handle)
        cp.abort_callback = hooks.abort_callback
        cp.abort_callback_data = ctypes.c_void_p(handle)
        ctx = C.llama_init_from_model(self._model, cp)
        if not ctx:
            raise AlignezError(
                f"llama.cpp could not create a context of {n_ctx} tokens for {self.path}; try a smaller n_ctx"
            )
        self._ctx = ctx
        self._mem = C.llama_get_memory(ctx)
        self.n_ctx = int(C.llama_n_ctx(ctx))
        self._batch = C.llama_batch_init(self.n_batch, 0, 1)
        self._sched = Scheduler(ctx, self._batch, self._vocab, self._hooks, self.n_batch, self.n_parallel)

    def close(self) -> None:
        """Free the context and the model (also done when the engine is garbage collected)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            C.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_hooks", None) is not None:
            hooks.unregister(self._hooks)
        C.llama_model_free(self._model)
        self._model = None

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

    @property
    def counts(self) -> DecodeCounts:
        """Return what this engine has decoded so far (calls, tokens read, tokens sampled)."""
        return self._sched.counts

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
        return () if self.is_chat else PLAIN_STOP

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Return the token ids of ``text``, BOS added when the model wants it; ``special`` False
        reads control-token text (``<|im_end|>``) as plain text (``Vocab.tokenize``)."""
        return self._vocab.tokenize(text, add_bos, special)

    def tokenize_parts(self, parts: Sequence[tuple[str, bool]], limit: int | None = None) -> list[int]:
        """Return the token ids of the concatenated ``(text, special)`` parts, BOS added when the
        model wants it; ``PromptTooLong`` as soon as there are more than ``limit`` (``Vocab.tokenize_parts``)."""
        return self._vocab.tokenize_parts(parts, True, limit)

    def chat_tokens(self, messages: Sequence[Mapping[str, str]], limit: int | None = None) -> list[int]:
        """Return the prompt tokens of a conversation in which only the chat template's own markup
        yields control tokens: a message's ``<|im_end|>`` stays text, so no message can close its
        turn and open another. The same tokens as ``tokenize(format_chat(messages))`` otherwise.

        A template that rewrites contents beyond stripping them cannot be cut into markup and
        contents (``chat_format.chat_parts``); its prompt is then tokenized whole when no content
        holds control-token text, and refused (AlignezError) when one does.
        """
        v = self._vocab
        parts = chat_parts(messages, self.chat_template, v.bos_text, v.eos_text)
        if parts is not None:
            return v.tokenize_parts(parts, True, limit)
        specials = self.special_texts()
        for i, m in enumerate(messages):
            hit = next((t for t in specials if t in m["content"]), None)
            if hit is not None:
                raise AlignezError(f"message {i} holds the control text {hit!r}, which this model's chat template "
                                   "cannot keep as plain text; remove it")
        return v.tokenize_parts([(self.format_chat(messages), True)], True, limit)

    def special_texts(self) -> list[str]:
        """Return the text of each control and unknown token (what special parsing turns into one)."""
        return self._vocab.special_texts

    @property
    def special_ids(self) -> frozenset[int]:
        """Return the ids of the control and unknown tokens."""
        return self._vocab.special_ids

    @property
    def max_piece_bytes(self) -> int | None:
        """Return the longest token text in bytes, a text of B bytes being at least B / this many
        tokens; None for vocabularies where that bound does not hold (``Vocab.max_piece_bytes``)."""
        return self._vocab.max_piece_bytes

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Return the text of ``tokens`` (special tokens left out)."""
        return self._vocab.detokenize(tokens)

    def format_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Return the prompt text for a conversation: the GGUF's own chat template for chat models,
        the plain ``User:``/``Assistant:`` format (``chat_format.plain_format``) for base models."""
        v = self._vocab
        return format_chat(messages, self.chat_template, v.bos_text, v.eos_text, add_generation_prompt)

    def prompt(self, user: str, system: str | None = None) -> str:
        """Return the prompt text for one user message (and an optional system prompt)."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.format_chat(msgs)

    # --- public operations -------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        on_token: TokenFn | None = None,
        share_prefix: bool = False,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Return one completion per prompt, decoded as parallel sequences in shared batches.

        ``sampling`` is one setting for all prompts or one per prompt (e.g. different seeds).
        ``on_token(i, text)`` streams new text of prompt i as it is decided; ``on_done(i)`` is told
        when prompt i's answer is finished (for a progress line that leaves the batches as they are).
        Each sequence has its own sampler, so a prompt's output does not depend on which others
        share the batch.
        ``share_prefix``: the leading tokens every prompt shares (a chat template's system prompt)
        are decoded once and their cells copied into each sequence; the answers are then those of
        this call's batch shapes, deterministic but not bit-equal to the same prompts without it.
        """
        seqs = self._generating(prompts, sampling)
        done = None if on_done is None else (lambda s: on_done(s.key))
        self._sched.run(seqs, on_token=on_token, on_done=done, share_prefix=share_prefix)
        return [self.completion(s) for s in seqs]

    def generate_with_first_logits(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling] = Sampling()
    ) -> tuple[list[Completion], np.ndarray]:
        """Return ``generate``'s completions and, from the same pass, the raw next-token logits at
        the end of each prompt (prompts x n_vocab, float32): what ``next_token_logits`` would give,
        without reading every prompt a second time."""
        seqs = self._generating(prompts, sampling)
        out = np.zeros((len(prompts), self.n_vocab), dtype=np.float32)

        def grab(s: Seq, pos: int, row: int) -> None:
            if pos == len(s.tokens) - 1:  # the prompt's last token: the first answer token's distribution
                out[s.key] = self._logits_row(row)

        self._sched.run(seqs, on_logits=grab)
        return [self.completion(s) for s in seqs], out

    def _generating(self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]) -> list[Seq]:
        """Return the generating sequences for ``prompts`` (one Sampling for all, or one each)."""
        sps = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(sps) != len(prompts):
            raise ValueError("one Sampling per prompt, or a single one for all")
        return [Seq(i, self.tokenize(p), sampling=sp.check()) for i, (p, sp) in enumerate(zip(prompts, sps))]

    @staticmethod
    def completion(s: Seq) -> Completion:
        """Return the completion of a finished generating sequence."""
        return Completion(s.text, len(s.generated), s.finish or "interrupted", len(s.tokens), np.asarray(s.logprobs), s.generated,
                          list(s.top_tokens) if s.n_top is not None else None)

    def generate_live(
        self, admit: AdmitFn, on_token: TokenFn | None = None, on_done: Callable[[Seq], None] | None = None,
        reuse_prompts: bool = False,
    ) -> None:
        """Decode the sequences ``admit()`` hands in, each as soon as a slot is free, until none is
        left (continuous admission: the server's requests join a running decode).

        ``admit`` is asked before every decode step, on this thread; it may also ``Seq.cancel`` a
        sequence, which then leaves at once (KV cells removed, slot free). A sequence with
        ``sampling=None`` is prefilled only (for an edit callback to read its last prompt token).
        Keys are the caller's: they reach ``on_token``, ``on_done`` and activation edits. A
        sequence with ``n_top`` set records each token's logprob and top alternatives
        (``Seq.top_tokens``, ``Completion.top_logprobs``). ``reuse_prompts``: a sequence may start
        from the prompt cells a finished one of the same ``Seq.cache_tag`` left (``Scheduler.run``);
        ``kept_prompt_cells`` / ``drop_kept_prompts`` (from ``admit``) keep the context from filling.
        """
        self._sched.run([], on_token=on_token, on_done=on_done, admit=admit, reuse_prompts=reuse_prompts)

    def kept_prompt_cells(self) -> int:
        """Return the KV cells a running ``generate_live`` holds for prompt reuse."""
        return self._sched.kept_cells()

    def drop_kept_prompts(self) -> None:
        """Free the cells held for prompt reuse (from ``admit``, between decode steps)."""
        self._sched.drop_kept()

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
        copied out of each node, so memory holds one batch of raw tensors at most. With
        ``share_prefix`` on, the token prefix every text shares (a system prompt) is decoded once.
        """
        self._check_site(site, "capture")
        if reduce not in ("last", "mean"):
            raise AlignezError(f"unknown reduce {reduce!r}; use last or mean")
        layers = [int(x) for x in layers]
        self._check_layers(layers)
        if len(set(layers)) != len(layers):
            raise AlignezError("capture layers must be distinct")
        need_all = reduce == "mean" and (self.n_layer - 1) in layers
        seqs = [
            Seq(i, self.tokenize(t), output_from=(mean_from[i] if mean_from is not None else 0) if need_all else None)
            for i, t in enumerate(texts)
        ]
        cap = Capture(len(texts), layers, self.n_embd, reduce, mean_from)
        done = 0

        def progress(_s: Seq) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, len(texts))

        st = self._hooks
        st.capture, st.capture_site = cap, site
        # Nothing after the deepest captured node is read (no logits, and the run's KV cells are
        # dropped at its end), so the graph stops there: a gate at layer 10 of 24 costs under half
        # a full prefill. The captured rows are the same bits (the same ops up to that node).
        st.stop_at = f"{site}-{max(layers)}".encode() if layers and self.stop_captures_early else None
        st.set_wanted()
        try:
            self._sched.run(seqs, on_done=progress, share_prefix=self.share_prefix)
        finally:
            st.capture, st.stop_at = None, None
            st.set_wanted()
        if reduce == "mean":
            cap.out /= np.maximum(cap.counts, 1)[:, None, None]
        return cap.out

    def _logits_row(self, row: int) -> np.ndarray:
        """Return a view of the logits of batch row ``row`` of the last decode (valid until the next)."""
        return np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))

    def next_token_logits(self, prompts: Sequence[str]) -> np.ndarray:
        """Return the logits (prompts x n_vocab) for the token after each prompt, under current steering."""
        out = np.zeros((len(prompts), self.n_vocab), dtype=np.float32)

        def grab(s: Seq, pos: int, row: int) -> None:
            out[s.key] = self._logits_row(row)

        self._sched.run([Seq(i, self.tokenize(p)) for i, p in enumerate(prompts)], on_logits=grab, share_prefix=self.share_prefix)
        return out

    def continuation_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str | Sequence[int]]
    ) -> list[np.ndarray]:
        """Return, per pair, the log-probability of each continuation token given the prompt and the
        tokens before it (for perplexity). A text continuation is tokenized after the prompt; a
        list of token ids (``Completion.tokens``) is used as it is."""
        seqs: list[Seq] = []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            ptok = self.tokenize(p)
            ctok = self.tokenize(c, add_bos=False) if isinstance(c, str) else [int(t) for t in c]
            seqs.append(Seq(i, ptok + ctok, output_from=len(ptok) - 1))
        res = [np.zeros(len(s.tokens) - 1 - (s.output_from or 0), dtype=np.float64) for s in seqs]

        def grab(s: Seq, pos: int, row: int) -> None:
            if pos + 1 < len(s.tokens):
                logits = self._logits_row(row)
                res[s.key][pos - (s.output_from or 0)] = float(logits[s.tokens[pos + 1]]) - logsumexp_row(logits)

        self._sched.run(seqs, on_logits=grab, share_prefix=self.share_prefix)
        return res

    # --- steering ----------------------------------------------------------------------------

    def _check_site(self, site: str, what: str) -> None:
        if site not in CAPTURE_SITES:
            raise AlignezError(f"unknown {what} site {site!r}; use one of {', '.join(CAPTURE_SITES)}")

    def _check_layers(self, layers: Sequence[int]) -> None:
        for layer in layers:
            if not 0 <= int(layer) < self.n_layer:
                raise AlignezError(f"layer {layer} does not exist; this model has layers 0..{self.n_layer - 1}")

    def _apply_cvecs(self, clear: bool = True) -> None:
        groups = self._cvecs + ([self._graph_vec] if self._graph_vec else [])
        if not groups:
            rc = C.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, -1, -1)
        else:
            buf = cvec_buffer(groups, self.n_layer, self.n_embd)
            rc = C.llama_set_adapter_cvec(
                self._ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size, self.n_embd, 1, self.n_layer - 1
            )
        if rc != 0:
            raise AlignezError(f"llama.cpp refused the control vector (code {rc})")
        if clear:
            C.llama_memory_clear(self._mem, True)

    def check_vectors(self, vectors: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Return ``vectors`` as float32 after checking layers and width fit this model."""
        return check_vectors(vectors, self.n_layer, self.n_embd)

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
            self._cvecs = [v for v in self._cvecs if v is not vecs]  # by identity: arrays have no ==
            self._apply_cvecs()

    @contextmanager
    def activation_edit(
        self, fn: EditFn, layers: Sequence[int], site: str = "ffn_out", all_tokens: bool = False
    ) -> Iterator[Edit]:
        """Run ``fn(layer, x, keys) -> x'`` on rows of the node ``site-layer`` inside this block.

        By default x holds the rows of the output positions: the last prompt token (prefill) and
        each generated token, one per sequence in the batch (the AlignEZ rule edits these).
        ``all_tokens=True`` edits every token, as a control vector does. keys are the prompt
        indices of the rows. Blocks nest. The block yields the edit (for ``pause_edit``).
        """
        self._check_site(site, "edit")
        self._check_layers(layers)
        e = Edit(fn, site, frozenset(int(x) for x in layers), all_tokens)
        st = self._hooks
        st.edits.append(e)
        st.set_wanted()
        C.llama_memory_clear(self._mem, True)
        try:
            yield e
        finally:
            st.edits = [x for x in st.edits if x is not e]
            st.set_wanted()
            C.llama_memory_clear(self._mem, True)

    # --- between the steps of a running decode (generate_live's admit) -----------------------

    def pause_edit(self, edit: Edit, paused: bool) -> None:
        """Pause an entered edit (it asks for no node, so the graph is not split for it) or resume it.

        Call it between decode steps only (from ``admit``). Unlike entering an edit, it keeps the
        KV cache: the caller vouches that the cells already there are right for their sequences.
        """
        if edit.paused != paused:
            edit.paused = paused
            self._hooks.set_wanted()

    def set_graph_vector(self, vectors: Mapping[int, np.ndarray] | None) -> None:
        """Add ``vectors`` (layer -> float32 direction, already checked) to every token of the next
        decode steps inside llama.cpp's graph, as a control vector, on top of any ``control_vector``
        block; None removes them.

        Call it between decode steps only (from ``admit``). Unlike ``control_vector`` it keeps the
        KV cache: the caller vouches that the cells already there are right for their sequences
        (the server switches between this and an equal per-sequence ``l_out`` edit, which adds the
        same float32 values: ``vector_edit``). The caller sets it back to None when the decode ends.
        """
        vectors = vectors or None
        if vectors is self._graph_vec:
            return  # the same object: nothing to copy into llama.cpp
        self._graph_vec = vectors  # type: ignore[assignment]
        self._apply_cvecs(clear=False)

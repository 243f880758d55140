"""Graph hooks: what the eval callback captures and edits, and the callback itself.

The C callbacks are module-level functions over a plain state object (``HookState``), found
from the user-data pointer llama.cpp hands back, as llama.cpp's cvector-generator passes
``cb_eval_user_data``. No callback holds a bound method of the Engine, so there is no
Engine -> callback -> Engine cycle and an Engine is freed as soon as it is dropped.

The callback is asked about EVERY node of every decode; it answers from one dict lookup on the
node name and says yes only to the nodes some capture or edit needs, because each yes splits
the graph. Declining costs nothing measurable (8 sequences x 48 tokens on SmolLM2: 1.674 s with
the callback declining every node, 1.669 s on a context without it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import llama_cpp.llama_cpp as C

from alignez_local.errors import AlignezError
from alignez_local.llama import bindings as B

# An edit receives (layer, rows of the node at the output positions, the caller's key of each
# row's sequence) and returns new rows (or None to leave them).
EditFn = Callable[[int, np.ndarray, Sequence[int]], "np.ndarray | None"]


@dataclass
class Edit:
    fn: EditFn
    site: str
    layers: frozenset[int]
    all_tokens: bool
    # A paused edit asks for no node and is not run (``Engine.pause_edit``, between decode steps).
    paused: bool = False


@dataclass
class Layout:
    """Where each sequence's tokens and outputs sit in the batch being decoded.

    ``n_ubatch == n_batch`` and a unified KV cache make every ``llama_decode`` one ubatch whose
    rows are the batch's tokens in order, so a row of a node maps back to (sequence, token).
    """

    n_tokens: int
    out_rows: np.ndarray  # batch row of each output, in output order
    out_keys: list[int]  # caller key of each output
    tok_keys: list[int]  # caller key of each batch row
    out_last: list[bool]  # is this output the last prompt token of a capture sequence
    spans: list[tuple[int, int, int, int]]  # (key, first batch row, n rows, token index of first)


class Capture:
    """Accumulates the rows a capture needs, one small copy per node and sequence."""

    def __init__(self, n_texts: int, layers: Sequence[int], n_embd: int, reduce: str, mean_from: Sequence[int] | None):
        self.col = {layer: i for i, layer in enumerate(layers)}
        self.out = np.zeros((n_texts, len(layers), n_embd), dtype=np.float32)
        self.reduce = reduce
        self.mean_from = mean_from
        self.counts = np.zeros(n_texts, dtype=np.int64)


@dataclass
class HookState:
    """Everything the eval and abort callbacks read and write, and nothing else."""

    n_embd: int
    wanted: dict[bytes, tuple[int, str]] = field(default_factory=dict)
    edits: list[Edit] = field(default_factory=list)
    capture: Capture | None = None
    capture_site: str = "ffn_out"
    layout: Layout | None = None
    error: BaseException | None = None
    abort: bool = False
    interrupted: bool = False
    layout_checked: bool = False
    handle: int = 0
    # Node names already said yes to in the graph being computed. With a control vector set,
    # llama.cpp's graph holds a second node named ffn_out-N (the residual sum before the vector is
    # added); only the first one is the MLP output, so each name is handled once per graph.
    asked: set[bytes] = field(default_factory=set)
    # A prefill-only capture needs nothing computed after its last node: the callback stops the
    # graph there (``Engine.capture(stop_early=True)``). None: compute the whole graph.
    stop_at: bytes | None = None

    def set_wanted(self) -> None:
        """Recompute the node names the callback says yes to from the edits and the capture."""
        wanted: dict[bytes, tuple[int, str]] = {}
        for e in self.edits:
            if e.paused:
                continue
            for layer in e.layers:
                wanted[f"{e.site}-{layer}".encode()] = (layer, e.site)
        if self.capture is not None:
            for layer in self.capture.col:
                wanted[f"{self.capture_site}-{layer}".encode()] = (layer, self.capture_site)
        self.wanted = wanted


# The user-data pointer llama.cpp hands back is a small integer handle into this table: one dict
# lookup per node, where recovering a Python object from an address would cost a ctypes cast.
_states: dict[int, HookState] = {}
_handles = itertools.count(1)


def register(state: HookState) -> int:
    """Make ``state`` reachable from the callbacks; return its user-data handle."""
    state.handle = next(_handles)
    _states[state.handle] = state
    return state.handle


def unregister(state: HookState) -> None:
    """Forget ``state`` (its context is freed)."""
    _states.pop(state.handle, None)


@C.ggml_backend_sched_eval_callback
def eval_callback(t: int, ask: bool, user: Any) -> bool:
    state = _states.get(user)
    if state is None:
        return not ask
    try:
        if ask:
            # Hot path: runs for every node of every decode.
            if not state.wanted:
                return False
            name = B.tensor_name(t)
            if name not in state.wanted or name in state.asked:
                return False
            state.asked.add(name)
            return True
        name = B.tensor_name(t)
        want = state.wanted.get(name)
        if want is not None:
            handle_node(state, t, *want)
        # False stops the graph here (ggml_backend_sched_compute_splits breaks out of the split):
        # later layers, the output norm and the logits are never computed.
        return name != state.stop_at
    except BaseException as err:  # noqa: BLE001 - an exception must not cross into C
        state.error = err
        state.abort = True
        return True


@C.ggml_abort_callback
def abort_callback(user: Any) -> bool:
    state = _states.get(user)
    return state is not None and state.abort


def handle_node(state: HookState, t: int, layer: int, site: str) -> None:
    """Run the edits and the capture that want node ``site-layer`` (tensor address ``t``)."""
    if not state.layout_checked:
        B.check_layout(t)
        state.layout_checked = True
    lay = state.layout
    if lay is None:
        return
    ne0, ne1 = B.tensor_rows(t)
    if ne0 != state.n_embd or B.tensor_type(t) != B.GGML_TYPE_F32:
        raise AlignezError(f"node {site}-{layer} is not an F32 [n_embd x tokens] tensor in this model")
    if not B.is_contiguous(t):
        raise AlignezError(f"node {site}-{layer} is not contiguous in this model")
    # The last layer keeps only the output rows (llama.cpp drops the rest before it).
    by_output = ne1 != lay.n_tokens and ne1 == len(lay.out_rows)
    if ne1 != lay.n_tokens and not by_output:
        raise AlignezError(f"node {site}-{layer} has {ne1} rows for a batch of {lay.n_tokens} tokens")
    for e in state.edits:
        if not e.paused and e.site == site and layer in e.layers and len(lay.out_rows):
            _run_edit(e, t, layer, site, lay, ne1, by_output)
    cap = state.capture
    if cap is not None and site == state.capture_site and layer in cap.col:
        if cap.reduce == "last":
            _capture_last(cap, t, layer, lay, by_output)
        else:
            _capture_mean(cap, t, layer, lay, by_output)


def _run_edit(e: Edit, t: int, layer: int, site: str, lay: Layout, ne1: int, by_output: bool) -> None:
    if e.all_tokens and not by_output:
        rows, keys = np.arange(ne1), lay.tok_keys
    else:
        rows, keys = (np.arange(len(lay.out_rows)) if by_output else lay.out_rows), lay.out_keys
    x = B.get_rows(t, rows, B.tensor_rows(t)[0])
    y = e.fn(layer, x, keys)
    if y is not None:
        y = np.ascontiguousarray(y, dtype=np.float32)
        if y.shape != x.shape or not np.all(np.isfinite(y)):
            raise AlignezError(f"an activation edit returned a bad array at {site}-{layer}")
        B.set_rows(t, rows, y)


def _capture_last(cap: Capture, t: int, layer: int, lay: Layout, by_output: bool) -> None:
    col = cap.col[layer]
    for i, (key, is_last) in enumerate(zip(lay.out_keys, lay.out_last)):
        if is_last:
            B.get_row(t, i if by_output else int(lay.out_rows[i]), cap.out[key, col])


def _capture_mean(cap: Capture, t: int, layer: int, lay: Layout, by_output: bool) -> None:
    col = cap.col[layer]
    ne0 = B.tensor_rows(t)[0]
    for key, row0, n, tok0 in lay.spans:
        start = cap.mean_from[key] if cap.mean_from is not None else 0
        lo = max(tok0, start)
        if lo >= tok0 + n:
            continue
        if by_output:
            # All mean-span tokens are outputs; their output rows are consecutive.
            first_out = int(np.searchsorted(lay.out_rows, row0 + (lo - tok0)))
            rows = np.arange(first_out, first_out + (tok0 + n - lo))
        else:
            rows = np.arange(row0 + (lo - tok0), row0 + n)
        cap.out[key, col] += B.get_rows(t, rows, ne0).sum(axis=0)
        if col == 0:
            cap.counts[key] += len(rows)

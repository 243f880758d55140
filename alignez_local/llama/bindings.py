"""ctypes access to llama.cpp and ggml below llama-cpp-python's bindings: the ggml tensor
functions, the ``struct ggml_tensor`` fields read in the eval callback, row copies, the log sink,
backend start-up and the default thread count."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np

import llama_cpp.llama_cpp as C
from llama_cpp._ctypes_extensions import load_shared_library

from alignez_local.errors import AlignezError

# --- ggml tensor access ----------------------------------------------------------------------

# The folder llama-cpp-python loaded libllama from (its own, or LLAMA_CPP_LIB_PATH's: an RPC
# build): a ggml-base from another folder would be a second copy with its own state.
_ggml = load_shared_library("ggml-base", C._base_path)
for _name, _args, _res in (
    ("ggml_backend_tensor_get", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    ("ggml_backend_tensor_set", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    ("ggml_get_name", [ctypes.c_void_p], ctypes.c_char_p),
    ("ggml_nelements", [ctypes.c_void_p], ctypes.c_int64),
    ("ggml_nbytes", [ctypes.c_void_p], ctypes.c_size_t),
    ("ggml_element_size", [ctypes.c_void_p], ctypes.c_size_t),
    ("ggml_type_size", [ctypes.c_int], ctypes.c_size_t),
    ("ggml_is_contiguous", [ctypes.c_void_p], ctypes.c_bool),
):
    getattr(_ggml, _name).argtypes = _args
    getattr(_ggml, _name).restype = _res

# struct ggml_tensor field offsets on LP64 (ggml.h): read directly in the hot "ask" path because
# a ctypes call per node costs more than a memory read. ``check_layout`` verifies them against
# ggml's own accessors on the first node an engine handles.
T_TYPE, T_NE, T_NAME = 0, 16, 256
GGML_TYPE_F32 = 0
_GGML_TYPE_LIMIT = 64  # ggml has ~40 types; a larger value means the offset is wrong


def tensor_rows(t: int) -> tuple[int, int]:
    """Return (ne0, ne1) of the tensor at address ``t``: row width and number of rows."""
    ne = (ctypes.c_int64 * 2).from_address(t + T_NE)
    return int(ne[0]), int(ne[1])


def tensor_type(t: int) -> int:
    """Return the ggml type id stored in the tensor at address ``t``."""
    return int(ctypes.c_int32.from_address(t + T_TYPE).value)


def tensor_name(t: int) -> bytes:
    """Return the node name of the tensor at address ``t`` (read from the struct, no ctypes call)."""
    return ctypes.string_at(t + T_NAME)


def check_layout(t: int) -> None:
    """Raise AlignezError unless the name, shape and type fields read at our offsets agree with
    what ggml's accessors say about tensor ``t`` (a 2-D node such as ``l_out-N``)."""
    ne0, ne1 = tensor_rows(t)
    ty = tensor_type(t)
    ok = (
        _ggml.ggml_get_name(t) == tensor_name(t)
        and _ggml.ggml_nelements(t) == ne0 * ne1
        and 0 <= ty < _GGML_TYPE_LIMIT
        and _ggml.ggml_type_size(ty) == _ggml.ggml_element_size(t)
        and (ty != GGML_TYPE_F32 or not _ggml.ggml_is_contiguous(t) or _ggml.ggml_nbytes(t) == 4 * ne0 * ne1)
    )
    if not ok:
        raise AlignezError("this llama.cpp build has an unexpected ggml_tensor layout; capture and edits are unsupported")


def is_contiguous(t: int) -> bool:
    """Return True when the tensor's rows are packed one after the other."""
    return bool(_ggml.ggml_is_contiguous(t))


def runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Yield (start, end, first row) for each run of consecutive row indices."""
    n = len(rows)
    a = 0
    while a < n:
        b = a + 1
        while b < n and rows[b] == rows[b - 1] + 1:
            b += 1
        yield a, b, int(rows[a])
        a = b


def get_row(t: int, row: int, out: np.ndarray) -> None:
    """Copy one row of an F32 tensor into the contiguous float32 array ``out``."""
    nbytes = out.size * 4
    _ggml.ggml_backend_tensor_get(t, out.ctypes.data, row * nbytes, nbytes)


def get_rows(t: int, rows: np.ndarray, ne0: int) -> np.ndarray:
    """Copy rows of an F32 [ne0 x rows] tensor into a new (len(rows), ne0) array, in few copies.

    ``ggml_backend_tensor_get`` (never ``tensor->data``) so GPU builds work too.
    """
    out = np.empty((len(rows), ne0), dtype=np.float32)
    row_bytes = ne0 * 4
    for a, b, r0 in runs(rows):
        _ggml.ggml_backend_tensor_get(t, out[a:b].ctypes.data, r0 * row_bytes, (b - a) * row_bytes)
    return out


def set_rows(t: int, rows: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` (len(rows), ne0) float32 into the given rows of an F32 tensor."""
    row_bytes = values.shape[1] * 4
    for a, b, r0 in runs(rows):
        chunk = np.ascontiguousarray(values[a:b])
        _ggml.ggml_backend_tensor_set(t, chunk.ctypes.data, r0 * row_bytes, (b - a) * row_bytes)


# --- logging and start-up --------------------------------------------------------------------

_log_lock = threading.Lock()
_recent_log: deque[str] = deque(maxlen=20)
_verbose = False
_backend_ready = False


@C.llama_log_callback
def _log_sink(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # Keep llama.cpp quiet by default but remember the last lines: they explain load failures.
    msg = text.decode("utf-8", "replace") if text else ""
    _recent_log.append(msg)
    if _verbose:
        print(msg, end="", file=sys.stderr, flush=True)


def init_backend(verbose: bool) -> None:
    """Install the log sink and start llama.cpp's backend once per process."""
    global _backend_ready, _verbose
    _verbose = verbose
    with _log_lock:
        if not _backend_ready:
            C.llama_log_set(_log_sink, ctypes.c_void_p(0))
            C.llama_backend_init()
            _backend_ready = True


def clear_log() -> None:
    """Forget the remembered log lines (before an operation whose failure they should explain)."""
    _recent_log.clear()


def last_error_line() -> str:
    """Return the last remembered llama.cpp log line that mentions an error, or ''."""
    return next((ln.strip() for ln in reversed(_recent_log) if "error" in ln.lower()), "")


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

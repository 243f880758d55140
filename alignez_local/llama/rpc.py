"""llama.cpp's RPC backend: a model's layers computed by ``rpc-server`` processes on other machines.

``--rpc HOST:PORT[,HOST:PORT...]`` hands each server to llama.cpp as a device (as llama.cpp's own
``--rpc`` does: ``ggml_backend_rpc_add_server``, then ``ggml_backend_register``), and the model's
layers are split over those devices in proportion to their free memory. The embeddings, the
sampling and everything this package does in numpy stay on this machine; captures and edits read
and write the remote hidden states through ``ggml_backend_tensor_get/set``, over the network.

llama.cpp aborts the whole process (GGML_ABORT) when it cannot connect to a server or the handshake
fails, so every server is first checked here with the same HELLO exchange, and a problem becomes
one error line. A server that dies in the middle of a run still aborts the process: that cannot be
caught from Python (a ``steer`` run resumes from its last finished stage).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

import llama_cpp.llama_cpp as C
from llama_cpp._ctypes_extensions import load_shared_library

from alignez_local.errors import AlignezError

BUILD_HINT = ("build one with scripts/build_rpc.sh and set LLAMA_CPP_LIB_PATH to the lib folder it prints "
              "before running alignez")

# The RPC protocol's HELLO (ggml-rpc.cpp): | command 14 (1 byte) | request size (8 bytes, LE) |
# request: 24 bytes of connection capabilities, all zero = plain TCP | and the reply:
# | size (8 bytes) | major, minor, patch, padding, 24 bytes of capabilities |.
_HELLO = 14
_CAPS = 24
_REPLY = 4 + _CAPS
HELLO_TIMEOUT_S = 10.0

# Devices of the servers this process has registered with llama.cpp, by endpoint: a server is
# registered once (registering it again would list its devices twice).
_registered: dict[str, list[int]] = {}


def parse_endpoints(text: str | Sequence[str]) -> tuple[str, ...]:
    """Return the endpoints in ``text`` ("HOST:PORT[,HOST:PORT...]", or a list of such strings),
    checked for form; raise AlignezError naming the first bad one."""
    parts = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for part in parts:
        for item in (p.strip() for p in part.split(",")):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise AlignezError(f"RPC server {item!r} is not HOST:PORT (for example 192.168.1.20:50052)")
            if item not in out:
                out.append(item)
    if not out:
        raise AlignezError("no RPC server given; use HOST:PORT[,HOST:PORT...]")
    return tuple(out)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def hello(endpoint: str, timeout: float = HELLO_TIMEOUT_S) -> tuple[int, int, int]:
    """Return the RPC protocol version (major, minor, patch) the server at ``endpoint`` speaks;
    raise AlignezError (one line, what to do) when it cannot be reached or does not answer."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<BQ", _HELLO, _CAPS) + bytes(_CAPS))
            head = _recv_exact(sock, 8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            reply = _recv_exact(sock, _REPLY) if size == _REPLY else b""
    except TimeoutError:
        raise AlignezError(f"RPC server {endpoint} did not answer within {timeout:g} s; an rpc-server serves one "
                           "client at a time: is another program using it?") from None
    except OSError as err:
        raise AlignezError(f"cannot reach RPC server {endpoint} ({err.strerror or err}); start one there with "
                           "rpc-server --host 0.0.0.0 --port PORT (scripts/build_rpc.sh builds it)") from None
    if len(reply) != _REPLY:
        raise AlignezError(f"{endpoint} did not answer the RPC handshake; is it an rpc-server built from the same "
                           "llama.cpp version (scripts/build_rpc.sh)?")
    return reply[0], reply[1], reply[2]


def _ggml() -> ctypes.CDLL:
    lib = load_shared_library("ggml", C._base_path)
    for name, args, res in (
        ("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p),
        ("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        ("ggml_backend_register", [ctypes.c_void_p], None),
        ("ggml_backend_reg_dev_count", [ctypes.c_void_p], ctypes.c_size_t),
        ("ggml_backend_reg_dev_get", [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    ):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = res
    return lib


def supported() -> bool:
    """True when the loaded llama.cpp library has the RPC backend (the prebuilt wheel does not)."""
    return bool(C.llama_supports_rpc())


def devices(endpoints: Sequence[str]) -> list[int]:
    """Register each server with llama.cpp (once per process) and return the device handles of all
    of them, in order: the list a model is loaded onto (``llama_model_params.devices``)."""
    if not supported():
        raise AlignezError(f"--rpc needs a llama.cpp library with the RPC backend, and this one has none; {BUILD_HINT}")
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    add = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else None
    if not add:
        raise AlignezError(f"this llama.cpp library's RPC backend cannot add servers; {BUILD_HINT}")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)
    out: list[int] = []
    for endpoint in endpoints:
        if endpoint not in _registered:
            hello(endpoint)  # llama.cpp would abort the process on a server it cannot reach
            server = add_server(endpoint.encode())
            if not server:
                raise AlignezError(f"llama.cpp could not add RPC server {endpoint}")
            lib.ggml_backend_register(server)
            _registered[endpoint] = [lib.ggml_backend_reg_dev_get(server, i)
                                     for i in range(lib.ggml_backend_reg_dev_count(server))]
        out.extend(_registered[endpoint])
    if not out:
        raise AlignezError("the RPC servers offer no device to compute on")
    return out

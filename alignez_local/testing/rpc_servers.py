"""llama.cpp ``rpc-server`` processes on this machine, for the ``--rpc`` tests and scripts/rpc_check.py.

``scripts/build_rpc.sh`` builds the server and an RPC-enabled llama.cpp library into one folder
(``ALIGNEZ_RPC_DIR``, default ``~/.cache/alignez-local/rpc``). A program that uses the library must
be started with ``LLAMA_CPP_LIB_PATH`` set (llama-cpp-python reads it when it is imported), so the
tests run it in a subprocess with ``rpc_env()``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from alignez_local.testing import free_port

DEFAULT_DIR = Path.home() / ".cache" / "alignez-local" / "rpc"


@dataclass(frozen=True)
class RpcBuild:
    """What scripts/build_rpc.sh made: the library folder and the server program."""

    lib: Path
    server: Path


def rpc_build(folder: str | os.PathLike[str] | None = None) -> RpcBuild | None:
    """Return the RPC build in ``folder`` (else ``ALIGNEZ_RPC_DIR``, else the default), or None
    when it has not been built."""
    root = Path(folder or os.environ.get("ALIGNEZ_RPC_DIR") or DEFAULT_DIR)
    build = RpcBuild(root / "lib", root / "bin" / "rpc-server")
    ok = (build.lib / "libllama.so").exists() and (build.lib / "libggml-rpc.so").exists() and build.server.exists()
    return build if ok else None


def rpc_env(build: RpcBuild) -> dict[str, str]:
    """Return this process's environment with llama-cpp-python pointed at the RPC library."""
    return {**os.environ, "LLAMA_CPP_LIB_PATH": str(build.lib), "PYTHONUNBUFFERED": "1"}


class RpcServers:
    """``count`` rpc-server processes on free localhost ports, each with ``threads`` CPU threads
    (pinned to ``cores`` when given, round robin); a context manager that stops them."""

    def __init__(self, build: RpcBuild, count: int = 2, threads: int = 1, cores: list[int] | None = None,
                 log: Path | None = None, timeout: float = 30.0) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        try:
            for i in range(count):
                port = free_port()
                cmd = [str(build.server), "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)]
                if cores:
                    cmd = ["taskset", "-c", str(cores[i % len(cores)]), *cmd]
                self.procs.append(subprocess.Popen(cmd, stdout=self._log, stderr=self._log))
                self.endpoints.append(f"127.0.0.1:{port}")
                self._wait_listening(port, self.procs[-1], timeout)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
        # A bare connect would be taken as a client by the one-client-at-a-time server, and close
        # at once: harmless, and the server then waits for the next client.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited with code {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"rpc-server did not listen on port {port} within {timeout:g} s")

    @property
    def spec(self) -> str:
        """The ``--rpc`` value naming every server."""
        return ",".join(self.endpoints)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "RpcServers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A real ``alignez serve`` in a subprocess (its log in a file), and a watcher that keeps asking its
/health while a test sends it hostile requests. Shared by the serve tests and scripts/soak_serve.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from alignez_local.testing import free_port


class ServeProcess:
    """``python -m alignez_local serve ARGS`` on a free port, started and ready (or an assertion)."""

    def __init__(self, model: str | Path, *args: str, log: Path, timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alignez_local", "serve", "-m", str(model), "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"alignez serve did not start:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        """Return the server's resident memory in kB (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> int | None:
        """Stop the server as an operator would (SIGTERM) and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class HealthWatch:
    """Asks GET /health every ``every`` seconds on a thread and keeps the slowest answer's time."""

    def __init__(self, url: str, every: float = 0.05, timeout: float = 10.0) -> None:
        self.url = url + "/health"
        self.every = every
        self.timeout = timeout
        self.worst = 0.0
        self.count = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        while self.count == 0 and not self.failures:  # one answer first: the watch is really running
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = client.get(self.url).status_code == 200
                    if not ok:
                        self.failures.append("status")
                except httpx.HTTPError as err:
                    self.failures.append(f"{type(err).__name__}: {err}")
                self.worst = max(self.worst, time.monotonic() - t0)
                self.count += 1
                self._stop.wait(self.every)

    def summary(self) -> dict[str, Any]:
        return {"checks": self.count, "worst_s": round(self.worst, 3), "failures": self.failures[:3]}

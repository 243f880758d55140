"""SIGTERM stops the long commands as Ctrl-C does (issue 28): the same one line, the shell's exit code
(130 Ctrl-C, 143 SIGTERM), every finished pair kept; and the decode guard of llama/interrupt.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alignez_local.llama import bindings
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.llama.interrupt import SigtermSeen, decode_guard, sigterm_as_ctrl_c

CLI = [sys.executable, "-m", "alignez_local"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stop_when(cmd: list[str], pairs: Path, sig: int, at_least: int = 3) -> tuple[int, str, list[dict]]:
    """Run ``cmd``, send ``sig`` once ``pairs`` holds ``at_least`` records; return (exit code, stderr, records)."""
    # A background job (nohup, some CI runners) hands down an ignored SIGINT: give it the terminal's default.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while len(pairs.read_text().splitlines() if pairs.exists() else []) < at_least:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, _records(pairs)  # every line parses: none was cut short


def test_generate_stops_on_sigterm_like_ctrl_c(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    cmd = CLI + ["generate", "-m", str(tiny_model_path), "--limit", "120", "--response-tokens", "48", "--threads", "1", "-o", str(out)]
    code, err, recs = stop_when(cmd, out, signal.SIGTERM)
    last = err.strip().splitlines()[-1]
    assert code == 143 and "Traceback" not in err, err
    assert last == f"terminated (SIGTERM): every finished pair is saved in {out}; run the same command again to continue where it stopped"
    assert 3 <= len(recs) < 120 and len({r["id"] for r in recs}) == len(recs)


def test_steer_stops_on_sigterm_like_ctrl_c(tiny_model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "steer"
    cmd = CLI + ["steer", "-m", str(tiny_model_path), "--positive", "Spanish", "--negative", "English", "--limit", "40",
                 "--response-tokens", "48", "--threads", "1", "--out", str(folder)]
    code, err, recs = stop_when(cmd, folder / "preferences.jsonl", signal.SIGTERM, at_least=2)
    last = err.strip().splitlines()[-1]
    assert code == 143 and "Traceback" not in err, err
    assert last.startswith("terminated (SIGTERM): every finished pair is saved in ") and "run the same command again" in last
    assert len(recs) >= 2 and not (folder / "vector.gguf").exists()


def test_a_stop_after_the_last_decode_step_is_not_lost(tiny_engine: Engine) -> None:
    """Ctrl-C that lands between the decode's last check and the end of the run used to vanish."""
    class Flags:
        interrupted = False
        abort = False

    flags = Flags()
    # What was there before the guard, put back after it: Python's Ctrl-C handler in a terminal,
    # SIG_IGN in a job started in the background (as CI may start the suite).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with decode_guard(flags):
            os.kill(os.getpid(), signal.SIGINT)  # the guard's handler sets the flags; nothing raises here
            time.sleep(0.05)
    assert flags.interrupted and signal.getsignal(signal.SIGINT) is before
    assert tiny_engine.generate(["Hi"], Sampling(max_tokens=2))[0].n_tokens == 2  # the next run starts clean


def sigterm_while_logging(sigterm: SigtermSeen) -> None:
    """Send this process SIGTERM in 10 ms and call llama.cpp's real log sink (through ctypes, as
    while a model loads) until ``sigterm`` has seen it; KeyboardInterrupt when it lands outside the sink."""
    timer = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        for _ in range(10**7):
            if sigterm.seen:
                break
            bindings._log_sink(2, b"load_tensors: loading\n", None)
    finally:
        timer.join()


def test_sigterm_noted_in_a_llama_callback_stops_the_next_decode(tiny_engine: Engine) -> None:
    """SIGTERM inside a C callback (llama.cpp's log while a model loads) is only noted there; the
    decode that follows must not start."""
    for _ in range(20):
        try:
            with sigterm_as_ctrl_c() as sigterm:
                sigterm_while_logging(sigterm)
                with pytest.raises(KeyboardInterrupt):
                    tiny_engine.generate(["Hi"], Sampling(max_tokens=2))
                assert sigterm.exit_code == 143
                return
        except KeyboardInterrupt:
            pass  # it landed outside the sink this time (raised at once): try again
    pytest.fail("SIGTERM never landed inside the log callback")

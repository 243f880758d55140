"""`--rpc`: a model's layers on llama.cpp rpc-server processes (issue 30, part 3).

The first tests need nothing but this machine: endpoints are read and checked, and a server that is
not there, is not an rpc-server, or never answers becomes one error line before llama.cpp is asked
(llama.cpp itself would abort the process). The rest need the RPC build (scripts/build_rpc.sh; CI
keeps the prebuilt library and skips them): two rpc-servers on localhost, the tiny model's states
and answers through them against the same model run locally, and `steer --rpc` end to end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.llama import rpc
from alignez_local.testing.rpc_servers import RpcServers, rpc_build, rpc_env

CLI = [sys.executable, "-m", "alignez_local"]
ROOT = Path(__file__).resolve().parents[1]


def test_endpoints_are_read_and_checked() -> None:
    assert rpc.parse_endpoints("10.0.0.2:50052, 10.0.0.3:50052") == ("10.0.0.2:50052", "10.0.0.3:50052")
    assert rpc.parse_endpoints(["a:1,b:2", "a:1"]) == ("a:1", "b:2")  # repeated flags, duplicates once
    for bad in ("localhost", "host:", ":50052", "host:port", "host:70000", ""):
        with pytest.raises(AlignezError, match="HOST:PORT"):
            rpc.parse_endpoints(bad)


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    yield sock, sock.getsockname()[1]
    sock.close()


def test_a_port_with_nothing_listening_is_one_line() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AlignezError, match=r"cannot reach RPC server 127\.0\.0\.1:\d+ .*rpc-server"):
        rpc.hello(f"127.0.0.1:{port}", timeout=2)


def test_a_server_that_is_not_an_rpc_server_is_one_line(listener: tuple[socket.socket, int]) -> None:
    sock, port = listener

    def answer_like_http() -> None:
        conn, _ = sock.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_like_http, daemon=True).start()
    with pytest.raises(AlignezError, match="did not answer the RPC handshake"):
        rpc.hello(f"127.0.0.1:{port}", timeout=5)


def test_a_busy_server_times_out_in_one_line(listener: tuple[socket.socket, int]) -> None:
    # A listening socket that never accepts: what a client sees while an rpc-server serves someone else.
    _, port = listener
    with pytest.raises(AlignezError, match="did not answer within 0.5 s; an rpc-server serves one client"):
        rpc.hello(f"127.0.0.1:{port}", timeout=0.5)


@pytest.mark.skipif(rpc.supported(), reason="this llama.cpp library has the RPC backend")
def test_rpc_without_an_rpc_library_is_one_line(tiny_model_path: Path) -> None:
    res = subprocess.run(CLI + ["chat", "-m", str(tiny_model_path), "--rpc", "127.0.0.1:50052", "--max-tokens", "4"],
                         input="hi\n", capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "RPC backend" in lines[0] and "scripts/build_rpc.sh" in lines[0], res.stderr


def test_a_bad_rpc_value_names_the_flag(tiny_model_path: Path) -> None:
    res = subprocess.run(CLI + ["chat", "-m", str(tiny_model_path), "--rpc", "nohost"],
                         input="hi\n", capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--rpc" in res.stderr and "HOST:PORT" in res.stderr


BUILD = rpc_build()
needs_build = pytest.mark.skipif(BUILD is None, reason="no RPC build of llama.cpp (scripts/build_rpc.sh)")


@needs_build
def test_states_and_answers_through_two_servers_equal_the_local_ones(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "rpc_check.py"), "-m", str(tiny_model_path),
                          "--servers", "2", "--tokens", "12", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["servers"] == 2 and rep["library"] == str(BUILD.lib)
    # The same CPU kernels compute each layer on the servers: against a local run that holds its
    # weights as the servers do (not repacked), bit for bit; the default local run (on this F32
    # model nothing is repacked either) within float32 rounding.
    plain, local = rep["vs_plain"], rep["vs_local"]
    assert plain["state_rel_diff_max"] == 0.0, plain["state_rel_diff_per_layer"]
    assert plain["identical"] == local["identical"] == {"unsteered": 4, "vector": 4, "edit": 4}
    assert local["state_rel_diff_max"] < 1e-4, local["state_rel_diff_per_layer"]
    assert rep["rpc"]["answers"]["vector"] != rep["rpc"]["answers"]["unsteered"]  # the steering acted
    assert rep["rpc"]["answers"]["edit"] != rep["rpc"]["answers"]["unsteered"]


@needs_build
def test_steer_runs_end_to_end_through_two_servers(tiny_model_path: Path, tmp_path: Path) -> None:
    assert BUILD is not None
    steer = ["steer", "-m", str(tiny_model_path), "--limit", "12", "--response-tokens", "24", "--strengths", "1,8",
             "--threads", "1"]
    with RpcServers(BUILD, count=2) as servers:
        res = subprocess.run(CLI + steer + ["--rpc", servers.spec, "-o", str(tmp_path / "rpc")],
                             capture_output=True, text=True, timeout=600, env=rpc_env(BUILD))
    assert res.returncode == 0, res.stderr[-2000:]
    local = subprocess.run(CLI + steer + ["-o", str(tmp_path / "local")], capture_output=True, text=True, timeout=600,
                           env=rpc_env(BUILD))
    assert local.returncode == 0, local.stderr[-2000:]
    # The same pairs were written (greedy), and the directions agree to float32 rounding.
    assert (tmp_path / "rpc" / "preferences.jsonl").read_text() == (tmp_path / "local" / "preferences.jsonl").read_text()
    a, b = read_control_vector(tmp_path / "local" / "vector.gguf"), read_control_vector(tmp_path / "rpc" / "vector.gguf")
    assert a.directions.keys() == b.directions.keys()
    for layer, d in a.directions.items():
        assert abs(d - b.directions[layer]).max() <= 1e-4 * max(1e-6, float(abs(d).max()))

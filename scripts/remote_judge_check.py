"""The remote judge against the local one on the same model, and fan-out over two servers vs one.

    .venv/bin/python scripts/remote_judge_check.py                                   # SmolLM2 as judge
    .venv/bin/python scripts/remote_judge_check.py --judge-model qwen2.5-coder-1.5b-instruct
    .venv/bin/python scripts/remote_judge_check.py --llama-server ~/llama-tools/bin/llama-server

N (question, answer) pairs (``judge_pairs``: the hand-made judge examples, then questions given
another question's answer) are scored (``Judge.scores``, log p(Yes) - log p(No)):
1. by the local judge as ``alignez eval`` runs it (one engine, --parallel prompts per batch, shared
   prefix decoded once); with --alone also one prompt at a time (no batch: the noise floor);
2. by the remote judge behind ``alignez serve`` serving the same GGUF (one thread each): one server,
   then the same pairs fanned out over two servers (--concurrency requests in flight per server);
3. with --llama-server PATH, by llama.cpp's own llama-server on the same GGUF (--llama-server-args
   adds its options; with --alone also one request at a time).
Printed: wall time of each, max |margin difference| to the local judge, agreement of the answer's
verdict (margin > 0, "Yes" more likely) and of the win/tie/loss verdicts between the answers to the
same question (the tie margin 0.5 nats, as ``alignez eval``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

from alignez_local.evaluation.judge import DEFAULT_MARGIN, Judge
from alignez_local.measures.verdicts import outcome_from_margin
from alignez_local.testing import free_port, judge_pairs
from alignez_local.evaluation.remote_judge import RemoteBackend
from alignez_local.models import resolve_model
from alignez_local.settings import RuntimeSettings, open_engine


@contextmanager
def server(cmd: Sequence[str], url: str, log: Path) -> Iterator[str]:
    """Start a server process, wait for its /health, yield its URL, stop it (by its own pid)."""
    import httpx

    with open(log, "w") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                sys.exit(f"{cmd[0]} exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{cmd[0]} did not start in 600 s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def alignez_serve(model: str, threads: int, parallel: int, ctx: int, log: Path) -> AbstractContextManager[str]:
    """Return the command's context: ``alignez serve`` on a free port."""
    port = free_port()
    cmd = [sys.executable, "-c", "from alignez_local.apps.cli import main; main()", "serve", "-m", model,
           "--port", str(port), "--threads", str(threads), "--parallel", str(parallel), "--ctx", str(ctx),
           "--deterministic"]  # its margins are compared with the local judge, which runs without the fast paths
    return server(cmd, f"http://127.0.0.1:{port}", log)


def timed_remote(urls: list[str], model: str, concurrency: int, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, float, RemoteBackend]:
    """Return (margins, seconds, backend) of one remote judging of ``pairs`` (no cache)."""
    backend = RemoteBackend(urls, model, concurrency=concurrency)
    t0 = time.monotonic()
    margins = Judge(backend).scores(pairs)
    return margins, time.monotonic() - t0, backend


def verdicts(margins: np.ndarray, pairs: list[tuple[str, str]]) -> list[str]:
    """Return the win/tie/loss verdict of every ordered pair of different answers to one question."""
    out = []
    for i, j in itertools.permutations(range(len(pairs)), 2):
        if pairs[i][0] == pairs[j][0]:
            out.append(outcome_from_margin(float(margins[i] - margins[j]), DEFAULT_MARGIN))
    return out


def compare(label: str, got: np.ndarray, ref: np.ndarray, pairs: list[tuple[str, str]], seconds: float | None) -> None:
    """Print one row: time, max |difference|, answer-verdict and pairwise-verdict agreement."""
    diff = np.abs(got - ref)
    same_sign = int(np.sum((got > 0) == (ref > 0)))
    vg, vr = verdicts(got, pairs), verdicts(ref, pairs)
    agree = sum(a == b for a, b in zip(vg, vr))
    t = f"{seconds:7.1f}" if seconds is not None else "      -"
    print(f"{label:<34} {t}  {diff.max():9.4f}  {np.median(diff):9.4f}  {same_sign:>3}/{len(got):<3}  "
          f"{agree:>3}/{len(vg):<3}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge-model", default="smollm2-135m-instruct", help="Bundled name or GGUF path.")
    ap.add_argument("-n", type=int, default=32, help="(question, answer) pairs [32].")
    ap.add_argument("--threads", type=int, default=1, help="Threads of the local judge and of each server [1].")
    ap.add_argument("--parallel", type=int, default=4, help="Prompts per batch, local judge and each server [4].")
    ap.add_argument("--concurrency", type=int, default=4, help="Remote requests in flight per server [4].")
    ap.add_argument("--ctx", type=int, default=4096, help="Context per prompt [4096].")
    ap.add_argument("--alone", action="store_true", help="Also the local judge one prompt at a time (the noise floor).")
    ap.add_argument("--llama-server", default=None, metavar="PATH", help="Also judge with llama.cpp's llama-server.")
    ap.add_argument("--llama-server-args", default="", metavar="ARGS",
                    help='Extra llama-server arguments, e.g. "-fa off --no-cache-prompt" (its defaults differ: docs/results.md).')
    ap.add_argument("--logs", default="/tmp", help="Folder for the servers' logs [/tmp].")
    args = ap.parse_args()
    gguf = str(resolve_model(args.judge_model))
    pairs = judge_pairs(args.n)
    logs = Path(args.logs)
    print(f"judge {args.judge_model}; {len(pairs)} (question, answer) pairs; {args.threads} thread(s) per model; "
          f"machine: {os.cpu_count()} CPUs ({os.uname().machine})", flush=True)

    t0 = time.monotonic()
    with open_engine(gguf, RuntimeSettings(threads=args.threads, n_ctx=args.ctx * args.parallel, parallel=args.parallel)) as eng:
        local = Judge(eng).scores(pairs)
    t_local = time.monotonic() - t0
    print(f"local judge: {t_local:.1f} s", flush=True)
    alone = None
    if args.alone:
        t0 = time.monotonic()
        with open_engine(gguf, RuntimeSettings(threads=args.threads, n_ctx=args.ctx, parallel=1)) as eng:
            eng.share_prefix = False
            alone = Judge(eng).scores(pairs)
        print(f"local judge, one prompt at a time: {time.monotonic() - t0:.1f} s", flush=True)

    rows: list[tuple[str, np.ndarray, float | None]] = []
    ctx = args.ctx * args.parallel
    with alignez_serve(gguf, args.threads, args.parallel, ctx, logs / "remote_judge_serve1.log") as u1, \
            alignez_serve(gguf, args.threads, args.parallel, ctx, logs / "remote_judge_serve2.log") as u2:
        timed_remote([u1], "judge", 1, pairs[:2])  # warm both servers (first decode, page cache)
        timed_remote([u2], "judge", 1, pairs[:2])
        one, t_one, _ = timed_remote([u1], "judge", args.concurrency, pairs)
        rows.append(("alignez serve, 1 server", one, t_one))
        two, t_two, b2 = timed_remote([u1, u2], "judge", args.concurrency, pairs)
        rows.append((f"alignez serve, 2 servers {list(b2.requests_per_url.values())}", two, t_two))
        if alone is not None:
            seq, t_seq, _ = timed_remote([u1], "judge", 1, pairs)
            rows.append(("alignez serve, 1 in flight", seq, t_seq))
    if args.llama_server:
        port = free_port()
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads),
               "-np", str(args.parallel), "-c", str(ctx), *args.llama_server_args.split()]
        with server(cmd, f"http://127.0.0.1:{port}", logs / "remote_judge_llama_server.log") as u:
            timed_remote([u], "judge", 1, pairs[:2])
            ls, t_ls, b = timed_remote([u], "judge", args.concurrency, pairs)
            rows.append(("llama-server, 1 server", ls, t_ls))
            if alone is not None:
                ls1, t_ls1, _ = timed_remote([u], "judge", 1, pairs)
                rows.append(("llama-server, 1 in flight", ls1, t_ls1))
            if b.bounded:
                print(f"llama-server: {b.bounded} judgments had a verdict word outside its top 20", flush=True)

    print(f"\n{'against the local judge (batched)':<34} {'s':>7}  {'max|diff|':>9}  {'median':>9}  "
          f"{'sign':>7}  {'verdicts':>7}")
    compare("local judge, batched", local, local, pairs, t_local)
    if alone is not None:
        compare("local judge, one at a time", alone, local, pairs, None)
    for label, m, t in rows:
        compare(label, m, local, pairs, t)
    if alone is not None:
        print(f"\n{'against the local judge (one at a time)':<34}")
        for label, m, t in rows:
            compare(label, m, alone, pairs, t)
    print(f"\nfan-out: 1 server {t_one:.1f} s, 2 servers {t_two:.1f} s (x{t_one / t_two:.2f})")


if __name__ == "__main__":
    main()

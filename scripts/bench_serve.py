#!/usr/bin/env python
"""Benchmark of ``alignez serve`` (issue 11): concurrent clients with mixed per-request steering.

1. The engine's own ``generate`` at --parallel 8 on the bench prompts, each steered as its request
   will be (``SteeringSet.batch_edits``, one call): the throughput the HTTP layer is compared with.
2. ``alignez serve`` as a subprocess (--parallel 8); for 1, 4, 8 and 16 concurrent streaming
   clients, the same prompts with mixed steering (a third unsteered, a third the vector, a third
   the profile): total generated tokens/s, p50/p99 time to first token and per-request latency.
3. 500 requests from 16 clients (short answers): failures, then /health must show 0 busy slots.

Greedy decoding with a fixed max_tokens, so every configuration generates the same tokens.
Prints a table; ``--json`` prints one JSON object on stdout and the table on stderr.

``--vs-llama-server`` (issue 21) instead runs ``alignez serve`` and llama.cpp's own
``llama-server`` side by side, one after the other in this run (never both at once), in rounds
A, B, A, B...: the same GGUF, threads, ``--parallel 8`` and context, the same chat prompts, greedy,
a fixed max_tokens, 1 and 8 concurrent streaming clients, with nothing loaded and with the shipped
SmolLM2 vector at strength 1 in both (``--vector`` chosen by every request / ``--control-vector-scaled
FILE:1``). Tokens are counted from the ``usage`` each server reports (neither is told to ignore EOS).
Prints, per condition and client count, the median over rounds of tok/s for both, the ratio,
p50 latency, and the server process's CPU seconds beside the wall seconds. ``alignez serve`` runs
with its defaults (flash attention and prompt cache on); ``--alignez-deterministic`` passes
``--deterministic``.

``--mixed`` (issue 32, EasySteer's table) instead measures what distinct steerings in one batch
cost: one ``alignez serve`` with SmolLM2's shipped vectors (helpful, french, the gated harmless),
its profile and two random-direction vectors loaded; 8 concurrent streaming clients send the same
prompts with 0, 1, 2, 4 and 8 distinct steerings (``MIXES``: request i takes steering i mod k;
vectors, another strength, the profile, the gated vector, a sum of two). Tokens/s of each against
the unsteered requests on the same server, and against a server with nothing loaded (no planning
prefill). Every round runs every condition, in an order rotated by one per round, so drift in the
machine's speed reaches each condition alike; the ratios are per round, then the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignez_local.apps.serve.steering import SteeringSet  # noqa: E402
from alignez_local.llama.engine import Sampling  # noqa: E402
from alignez_local.models import resolve_model  # noqa: E402
from alignez_local.settings import RuntimeSettings, open_engine  # noqa: E402
from alignez_local.testing import free_port  # noqa: E402

VEC = ROOT / "vectors" / "smollm2-135m-instruct" / "helpful.gguf"
PROF = ROOT / "vectors" / "smollm2-135m-instruct" / "helpful.profile.gguf"


def prompts(n: int) -> list[str]:
    rows = [json.loads(x) for x in (ROOT / "alignez_local" / "data" / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    helpful = [r["prompt"] for r in rows if r.get("kind") == "helpful"]
    return [helpful[i % len(helpful)] for i in range(n)]


def steering_for(i: int, defaults: dict[str, float]) -> dict[str, float]:
    """A third unsteered, a third the vector, a third the profile (at their default strengths)."""
    return [{}, {"vec": defaults["vec"]}, {"prof": defaults["prof"]}][i % 3]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def engine_baseline(model: str, texts: list[str], defaults: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    # Flash attention as alignez serve runs by default (the engine's own default is off).
    settings = RuntimeSettings(threads=args.threads, n_ctx=args.ctx, parallel=8, flash_attn=True)
    with open_engine(model, settings) as engine:
        st, _ = SteeringSet.load(engine, [f"vec={VEC}"], [f"prof={PROF}"])
        ps = [engine.prompt(t) for t in texts]
        t0 = time.perf_counter()
        with ExitStack() as stack:
            for e in st.batch_edits(engine, ps, [steering_for(i, defaults) for i in range(len(ps))]):
                stack.enter_context(engine.activation_edit(e.fn, e.layers, e.site, e.all_tokens))
            done = engine.generate(ps, Sampling(max_tokens=args.max_tokens))
        dt = time.perf_counter() - t0
    n = sum(c.n_tokens for c in done)
    return {"requests": len(ps), "tokens": n, "seconds": round(dt, 3), "tok_per_s": round(n / dt, 2)}


def one_request(url: str, key: str | None, text: str, steering: dict[str, float] | None, max_tokens: int,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streaming chat request. ``key`` None: no Authorization header; ``steering`` None: no
    steering field (alignez: the server's defaults; llama-server: its start-up vector); ``extra``:
    more body fields."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            **({"steering": steering} if steering is not None else {}), **(extra or {})}
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, int] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {key}"} if key else None) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                err = obj["error"]
                return {"ok": False, "error": err.get("message", str(err)) if isinstance(err, dict) else str(err)}
            if obj.get("usage"):
                usage = obj["usage"]
            elif ttft is None and obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return {"ok": bool(usage), "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0, "tokens": usage.get("completion_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens", 0)}


def run_clients(url: str, key: str, texts: list[str], defaults: dict[str, float], clients: int, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda i: one_request(url, key, texts[i], steering_for(i, defaults), max_tokens), range(len(texts))))
    dt = time.perf_counter() - t0
    ok = [r for r in res if r["ok"]]
    n = sum(r["tokens"] for r in ok)
    out: dict[str, Any] = {"clients": clients, "requests": len(res), "failures": len(res) - len(ok), "tokens": n,
                           "seconds": round(dt, 3), "tok_per_s": round(n / dt, 2)}
    if ok:
        for k in ("ttft", "latency"):
            xs = [r[k] for r in ok]
            out[f"{k}_p50_s"], out[f"{k}_p99_s"] = round(pct(xs, 0.5), 3), round(pct(xs, 0.99), 3)
    return out


def start_server(model: str, args: argparse.Namespace, key: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "alignez_local", "serve", "-m", model, "--port", str(port), "--parallel", "8",
           "--ctx", str(args.ctx), "--vector", f"vec={VEC}", "--profile", f"prof={PROF}", "--api-key", key]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(proc, url):
        raise SystemExit(f"the server did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, url


def wait_ready(proc: subprocess.Popen[Any], url: str, seconds: float = 300) -> bool:
    """Return True once ``url``/health answers 200; False if the process ended or time ran out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


# --- side by side with llama-server (issue 21) ---------------------------------------------------

LLAMA_SERVER = Path.home() / "llama-tools" / "bin" / "llama-server"


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side_command(which: str, model: str, port: int, vector: bool, args: argparse.Namespace) -> list[str]:
    """Return the command line of one server: ``alignez`` or ``llama``, same model, threads, slots, context."""
    threads = str(args.threads or 1)
    if which.startswith("alignez"):
        cmd = [sys.executable, "-m", "alignez_local", "serve", "-m", model, "--port", str(port), "--parallel", "8",
               "--ctx", str(args.ctx), "--threads", threads]
        if vector:
            cmd += ["--vector", f"vec={VEC}:1"]
        return cmd + (["--deterministic"] if args.alignez_deterministic or which == "alignez-det" else [])
    cmd = [str(args.llama_server), "-m", model, "--port", str(port), "--parallel", "8", "-c", str(args.ctx),
           "--threads", threads, "--threads-batch", threads, "-fa", args.llama_fa]
    return cmd + (["--control-vector-scaled", f"{VEC}:1"] if vector else [])


def start_side(cmd: list[str], port: int, cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(proc, url):
        proc.kill()
        raise SystemExit(f"the server did not start: {' '.join(cmd)}")
    return proc, url


def side_level(url: str, pid: int, texts: list[str], clients: int, max_tokens: int,
               extra: dict[str, Any] | None = None, steerings: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """``texts`` from ``clients`` concurrent clients (request i steered by ``steerings[i]``, else
    no steering field); tok/s, the server's CPU seconds and p50 latency."""
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda i: one_request(url, None, texts[i], steerings[i] if steerings else None, max_tokens, extra),
                            range(len(texts))))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
    ok = [r for r in res if r["ok"]]
    n = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(res), "failures": len(res) - len(ok), "tokens": n,
            "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "wall_s": round(wall, 3), "server_cpu_s": round(cpu, 3),
            "tok_per_s": round(n / wall, 2), "latency_p50_s": round(pct([r["latency"] for r in ok], 0.5), 3) if ok else None}


def side_by_side(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run both servers in alternating rounds; return every measurement and the medians."""
    if not Path(args.llama_server).exists() and shutil.which(str(args.llama_server)) is None:
        raise SystemExit(f"llama-server not found at {args.llama_server}; give --llama-server PATH")
    levels = {1: prompts(args.requests_1), 8: prompts(args.requests_8)}
    runs: list[dict[str, Any]] = []
    # alignez-det: alignez serve --deterministic in the same rounds (what the fast paths are worth)
    sides = ["alignez", "llama"] + (["alignez-det"] if args.with_deterministic else [])
    for vector in (False, True):
        for rnd in range(args.rounds):
            for which in sides[rnd % len(sides):] + sides[: rnd % len(sides)]:
                port = free_port()
                cmd = side_command(which, model, port, vector, args)
                proc, url = start_side(cmd, port)
                # Both servers reuse a slot's cached prompt prefix unless told not to (alignez: --deterministic).
                extra = {"cache_prompt": False} if which == "llama" and args.llama_no_cache_prompt else None
                try:
                    one_request(url, None, levels[1][0], None, 4, extra)  # warm-up, not counted
                    for clients, texts in levels.items():
                        lv = side_level(url, proc.pid, texts, clients, args.max_tokens, extra)
                        lv.update(server=which, vector=vector, round=rnd)
                        runs.append(lv)
                        print(f"progress: {json.dumps(lv)}", file=sys.stderr, flush=True)
                finally:
                    proc.terminate()
                    proc.wait(60)
    rows = []
    for vector in (False, True):
        for clients in levels:
            pick = {w: [r for r in runs if r["server"] == w and r["vector"] == vector and r["clients"] == clients]
                    for w in sides}
            med = {w: {k: statistics.median(r[k] for r in rs) for k in ("tok_per_s", "latency_p50_s", "wall_s", "server_cpu_s")}
                   for w, rs in pick.items()}
            ratios = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(pick["alignez"], pick["llama"])]
            rows.append({"vector": vector, "clients": clients, "alignez": med["alignez"], "llama_server": med["llama"],
                         "ratio": round(med["alignez"]["tok_per_s"] / med["llama"]["tok_per_s"], 3),
                         "ratio_per_round": [round(x, 3) for x in ratios],
                         "tokens": {w: [r["tokens"] for r in rs] for w, rs in pick.items()},
                         "prompt_tokens": {w: [r["prompt_tokens"] for r in rs] for w, rs in pick.items()},
                         "failures": sum(r["failures"] for rs in pick.values() for r in rs)})
            if "alignez-det" in pick:
                rows[-1]["deterministic"] = med["alignez-det"]
                rows[-1]["ratio_deterministic"] = round(med["alignez-det"]["tok_per_s"] / med["llama"]["tok_per_s"], 3)
                rows[-1]["ratio_deterministic_per_round"] = [
                    round(a["tok_per_s"] / b["tok_per_s"], 3) for a, b in zip(pick["alignez-det"], pick["llama"])]
    return {"runs": runs, "rows": rows}


def side_table(rows: list[dict[str, Any]]) -> str:
    out = ["| vector | clients | alignez tok/s | llama-server tok/s | ratio (per round) | p50 latency alignez / llama (s) "
           "| server CPU / wall alignez (s) | server CPU / wall llama (s) |",
           "|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        a, b = r["alignez"], r["llama_server"]
        out.append(f"| {'helpful x1' if r['vector'] else 'none'} | {r['clients']} | {a['tok_per_s']:.1f} | {b['tok_per_s']:.1f} "
                   f"| **{r['ratio']:.2f}x** ({', '.join(f'{x:.2f}' for x in r['ratio_per_round'])}) "
                   f"| {a['latency_p50_s']:.2f} / {b['latency_p50_s']:.2f} | {a['server_cpu_s']:.1f} / {a['wall_s']:.1f} "
                   f"| {b['server_cpu_s']:.1f} / {b['wall_s']:.1f} |"
                   + (f" {r['deterministic']['tok_per_s']:.1f}: **{r['ratio_deterministic']:.2f}x** "
                      f"({', '.join(f'{x:.2f}' for x in r['ratio_deterministic_per_round'])}) |" if "deterministic" in r else ""))
    if rows and "deterministic" in rows[0]:
        out[0] += " alignez --deterministic tok/s: ratio (per round) |"
        out[1] += "---|"
    return "\n".join(out)


def main_side_by_side(args: argparse.Namespace) -> None:
    model = str(resolve_model(args.model))
    res = side_by_side(model, args)
    machine = {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)), "platform": platform.platform(),
               "processor": platform.processor() or platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    result = {"machine": machine, "model": Path(model).name, "threads": args.threads or 1, "parallel": 8, "ctx": args.ctx,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "llama_fa": args.llama_fa,
              "llama_cache_prompt": not args.llama_no_cache_prompt,
              "alignez_deterministic": args.alignez_deterministic, **res}
    head = (f"{Path(model).name}, threads {args.threads or 1} in both, --parallel 8, ctx {args.ctx}, {args.max_tokens} tokens greedy, "
            f"{args.rounds} alternating rounds (medians), llama-server -fa {args.llama_fa} "
            f"cache_prompt {'off' if args.llama_no_cache_prompt else 'on (its default)'}, alignez "
            f"{'--deterministic' if args.alignez_deterministic else 'defaults (flash attention, prompt cache)'}; "
            f"CPUs allowed {machine['affinity']} of {machine['cpus']}")
    print(head + "\n" + side_table(res["rows"]), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))


# --- distinct steerings in one batch (issue 32) -------------------------------------------------

SMOL = ROOT / "vectors" / "smollm2-135m-instruct"
# (label, request i's steering for k distinct steerings: MIX[i % k]); names as loaded by mixed_server.
MIX: list[tuple[str, dict[str, float]]] = [
    ("helpful vector", {"helpful": 0.5}),
    ("french vector", {"french": 0.0442}),
    ("helpful profile", {"prof": 1.0}),
    ("gated harmless vector", {"harmless": 0.25}),
    ("helpful vector at half strength", {"helpful": 0.25}),
    ("random direction A", {"randA": 1.0}),
    ("random direction B", {"randB": 1.0}),
    ("helpful + french", {"helpful": 0.5, "french": 0.0442}),
]
DISTINCT = (0, 1, 2, 4, 8)


def random_vectors(d: Path) -> list[Path]:
    """Write two control vectors on helpful.gguf's layers with its per-layer norms in random
    directions (the project's writer; fixed seed), and return their paths."""
    from alignez_local.formats.control_vector import ControlVector, read_control_vector, write_control_vector

    import numpy as np

    ref = read_control_vector(SMOL / "helpful.gguf")
    rng = np.random.default_rng(32)
    out = []
    for name in ("randA", "randB"):
        dirs = {}
        for layer, v in ref.directions.items():
            r = rng.standard_normal(v.shape).astype(np.float32)
            dirs[layer] = (r * (np.linalg.norm(v) / np.linalg.norm(r))).astype(np.float32)
        out.append(write_control_vector(d / f"{name}.gguf", ControlVector(dirs, model_hint=ref.model_hint)))
    return out


def mixed_server(model: str, args: argparse.Namespace, loaded: bool, rand: list[Path], root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``alignez serve`` from the checkout ``root`` (its ``alignez_local`` comes first on the path)."""
    port = free_port()
    cmd = [sys.executable, "-m", "alignez_local", "serve", "-m", model, "--port", str(port), "--parallel", "8",
           "--ctx", str(args.ctx), "--threads", str(args.threads or 1), *args.serve_args.split()]
    if loaded:
        cmd += ["--vector", f"helpful={SMOL / 'helpful.gguf'}", "--vector", f"french={SMOL / 'french.gguf'}",
                "--vector", f"harmless={SMOL / 'harmless.gguf'}", "--vector", f"randA={rand[0]}",
                "--vector", f"randB={rand[1]}", "--profile", f"prof={SMOL / 'helpful.profile.gguf'}"]
    return start_side(cmd, port, cwd=root)


def mixed_level(url: str, pid: int, texts: list[str], k: int, max_tokens: int) -> dict[str, Any]:
    """8 clients, request i steered by MIX[i % k] (k 0: unsteered)."""
    return side_level(url, pid, texts, 8, max_tokens, steerings=[MIX[i % k][1] if k else {} for i in range(len(texts))])


def mixed_runs(model: str, args: argparse.Namespace, rand: list[Path]) -> list[dict[str, Any]]:
    """Per round: each loaded server (this checkout, and --compare-root's) runs every condition in
    an order rotated by one per round, and the plain server (nothing loaded) runs unsteered; the
    servers' order rotates too. Return one record per (round, server, condition)."""
    texts = prompts(args.mixed_requests)
    servers: list[tuple[str, Path, bool]] = [("this", ROOT, True), ("plain", ROOT, False)]
    if args.compare_root:
        servers.insert(1, ("compare", Path(args.compare_root).resolve(), True))
    runs: list[dict[str, Any]] = []
    for rnd in range(args.mixed_rounds):
        order = list(DISTINCT[rnd % len(DISTINCT):] + DISTINCT[: rnd % len(DISTINCT)])
        for label, root, loaded in servers[rnd % len(servers):] + servers[: rnd % len(servers)]:
            proc, url = mixed_server(model, args, loaded, rand, root)
            try:
                one_request(url, None, texts[0], {}, 4)  # warm-up, not counted
                for k in order if loaded else [0]:
                    lv = mixed_level(url, proc.pid, texts, k, args.max_tokens)
                    lv.update(round=rnd, server=label, condition=k)
                    runs.append(lv)
                    print(f"progress: {json.dumps(lv)}", file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    return runs


def mixed_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per loaded server and condition: median tok/s, and per-round ratios to the same server's
    unsteered requests and to the plain server's."""
    by = {(r["round"], r["server"], r["condition"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    rows = []
    for server in [x for x in ("this", "compare") if any(r["server"] == x for r in runs)]:
        for k in DISTINCT:
            mine = [by[(n, server, k)] for n in rounds]
            vs0 = [by[(n, server, k)]["tok_per_s"] / by[(n, server, 0)]["tok_per_s"] for n in rounds]
            vsp = [by[(n, server, k)]["tok_per_s"] / by[(n, "plain", 0)]["tok_per_s"] for n in rounds]
            rows.append({"server": server, "distinct": k, "steerings": [MIX[i][0] for i in range(k)],
                         "tok_per_s": statistics.median(r["tok_per_s"] for r in mine),
                         "tokens": [r["tokens"] for r in mine], "failures": sum(r["failures"] for r in mine),
                         "server_cpu_s": statistics.median(r["server_cpu_s"] for r in mine),
                         "wall_s": statistics.median(r["wall_s"] for r in mine),
                         "vs_unsteered": round(statistics.median(vs0), 3), "vs_unsteered_per_round": [round(x, 3) for x in vs0],
                         "vs_plain_server": round(statistics.median(vsp), 3)})
    plain = [by[(n, "plain", 0)] for n in rounds]
    rows.append({"server": "plain", "distinct": 0, "steerings": [], "tok_per_s": statistics.median(r["tok_per_s"] for r in plain),
                 "tokens": [r["tokens"] for r in plain], "failures": sum(r["failures"] for r in plain),
                 "server_cpu_s": statistics.median(r["server_cpu_s"] for r in plain),
                 "wall_s": statistics.median(r["wall_s"] for r in plain)})
    return rows


def mixed_table(rows: list[dict[str, Any]]) -> str:
    out = ["| server | distinct steerings (8 clients) | tok/s | vs unsteered, same server (per round) "
           "| vs server with nothing loaded | server CPU / wall (s) | tokens per round |", "|---|---|---:|---|---:|---|---|"]
    for r in rows:
        if r["server"] == "plain":
            out.append(f"| nothing loaded | 0 | {r['tok_per_s']:.1f} | | 1.00x | {r['server_cpu_s']:.1f} / {r['wall_s']:.1f} "
                       f"| {', '.join(map(str, r['tokens']))} |")
            continue
        out.append(f"| {r['server']} | {r['distinct']} | {r['tok_per_s']:.1f} | **{r['vs_unsteered']:.2f}x** "
                   f"({', '.join(f'{x:.2f}' for x in r['vs_unsteered_per_round'])}) | {r['vs_plain_server']:.2f}x "
                   f"| {r['server_cpu_s']:.1f} / {r['wall_s']:.1f} | {', '.join(map(str, r['tokens']))} |")
    return "\n".join(out)


def main_mixed(args: argparse.Namespace) -> None:
    import tempfile

    model = str(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        rand = random_vectors(Path(tmp))
        runs = mixed_runs(model, args, rand)
    rows = mixed_rows(runs)
    machine = {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)), "platform": platform.platform(),
               "processor": platform.processor() or platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    head = (f"{Path(model).name}, alignez serve {args.serve_args or '(defaults)'}"
            f"{f', compare = {args.compare_root}' if args.compare_root else ''}, threads {args.threads or 1}, --parallel 8, "
            f"8 clients x {args.mixed_requests} requests, {args.max_tokens} tokens greedy, {args.mixed_rounds} rounds; "
            f"steerings in order: {'; '.join(f'{i + 1} {lab} {json.dumps(st)}' for i, (lab, st) in enumerate(MIX))}")
    print(head + "\n" + mixed_table(rows), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"machine": machine, "model": Path(model).name, "threads": args.threads or 1,
                          "serve_args": args.serve_args, "compare_root": args.compare_root, "max_tokens": args.max_tokens, "mix": MIX, "runs": runs,
                          "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 48 (64 with --vs-llama-server)")
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    ap.add_argument("--soak", type=int, default=500, help="requests of the 16-client soak (0 = skip)")
    ap.add_argument("--soak-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    side = ap.add_argument_group("side by side with llama-server (issue 21)")
    side.add_argument("--vs-llama-server", action="store_true", help="run the side-by-side benchmark instead")
    side.add_argument("--llama-server", default=str(LLAMA_SERVER), help="the llama-server binary")
    side.add_argument("--llama-fa", choices=("auto", "on", "off"), default="auto", help="llama-server's -fa")
    side.add_argument("--llama-no-cache-prompt", action="store_true",
                      help="send cache_prompt: false to llama-server (no reuse of a slot's cached prompt prefix)")
    side.add_argument("--alignez-deterministic", action="store_true", help="start alignez serve with --deterministic")
    side.add_argument("--with-deterministic", action="store_true",
                      help="also measure alignez serve --deterministic in the same rounds (a third server)")
    side.add_argument("--rounds", type=int, default=2, help="alternating rounds per condition (A,B then B,A...)")
    side.add_argument("--requests-1", type=int, default=6, help="requests sent by the single client")
    side.add_argument("--requests-8", type=int, default=24, help="requests sent by the 8 clients")
    mix = ap.add_argument_group("distinct steerings in one batch (issue 32)")
    mix.add_argument("--mixed", action="store_true", help="run the mixed-steering table instead")
    mix.add_argument("--mixed-requests", type=int, default=24, help="requests per condition (8 clients)")
    mix.add_argument("--mixed-rounds", type=int, default=3, help="rounds; every condition runs once per round")
    mix.add_argument("--serve-args", default="", help="more alignez serve options for --mixed (e.g. --deterministic)")
    mix.add_argument("--compare-root", default=None, metavar="DIR",
                     help="another checkout (e.g. a git worktree of an older commit) whose alignez serve is measured "
                          "in the same rounds: before/after in one run")
    args = ap.parse_args()
    if args.mixed:
        if args.compare_root and not (Path(args.compare_root) / "alignez_local").is_dir():
            raise SystemExit(f"--compare-root {args.compare_root}: no alignez_local package there; give a checkout of this repository")
        args.max_tokens = args.max_tokens or 64
        main_mixed(args)
        return
    if args.vs_llama_server:
        args.max_tokens = args.max_tokens or 64
        main_side_by_side(args)
        return
    args.max_tokens = args.max_tokens or 48
    model = str(resolve_model(args.model))
    key = "bench-" + os.urandom(4).hex()
    texts = prompts(args.requests)
    defaults = {"vec": 1.0, "prof": 1.0}
    proc, url = start_server(model, args, key)
    try:
        listed = httpx.get(url + "/v1/steering", headers={"Authorization": f"Bearer {key}"}).json()
        defaults = {d["name"]: d["default_strength"] for d in listed["data"]}
        levels = []
        for c in (1, 4, 8, 16):
            levels.append(run_clients(url, key, texts, defaults, c, args.max_tokens))
            print(f"progress: {json.dumps(levels[-1])}", file=sys.stderr, flush=True)
        soak = None
        if args.soak:
            soak = run_clients(url, key, prompts(args.soak), defaults, 16, args.soak_tokens)
            time.sleep(0.5)
            soak["health_after"] = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(60)
    base = engine_baseline(model, texts, defaults, args)  # after the server stopped: no competition
    by = {lv["clients"]: lv for lv in levels}
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "model": Path(model).name, "max_tokens": args.max_tokens, "threads": args.threads, "steering_defaults": defaults,
        "engine_generate_parallel8": base, "levels": levels, "soak": soak,
        "ratio_8_clients_vs_engine": round(by[8]["tok_per_s"] / base["tok_per_s"], 3),
        "ratio_8_clients_vs_1_client": round(by[8]["tok_per_s"] / by[1]["tok_per_s"], 3),
    }
    table = [f"engine generate, parallel 8: {base['tok_per_s']} tok/s ({base['tokens']} tokens, {base['seconds']} s)",
             "clients  tok/s   ttft p50/p99 (s)   latency p50/p99 (s)   failures"]
    for lv in levels:
        table.append(f"{lv['clients']:>7}  {lv['tok_per_s']:>6}   {lv.get('ttft_p50_s')}/{lv.get('ttft_p99_s')}"
                     f"   {lv.get('latency_p50_s')}/{lv.get('latency_p99_s')}   {lv['failures']}")
    table.append(f"8 clients / engine: {result['ratio_8_clients_vs_engine']}x; 8 clients / 1 client: {result['ratio_8_clients_vs_1_client']}x")
    if soak:
        table.append(f"soak: {soak['requests']} requests from 16 clients, {soak['failures']} failures, "
                     f"after: {soak['health_after']}")
    print("\n".join(table), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

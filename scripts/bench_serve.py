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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
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
    settings = RuntimeSettings(threads=args.threads, n_ctx=args.ctx, parallel=8)
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


def one_request(url: str, key: str, text: str, steering: dict[str, float], max_tokens: int) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "steering": steering}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"ok": False, "error": obj["error"]["message"]}
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif ttft is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return {"ok": True, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0, "tokens": tokens}


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "alignez_local", "serve", "-m", model, "--port", str(port), "--parallel", "8",
           "--ctx", str(args.ctx), "--vector", f"vec={VEC}", "--profile", f"prof={PROF}", "--api-key", key]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    ap.add_argument("--soak", type=int, default=500, help="requests of the 16-client soak (0 = skip)")
    ap.add_argument("--soak-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
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

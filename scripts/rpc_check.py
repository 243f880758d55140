#!/usr/bin/env python3
"""`--rpc` checked against the same model run locally: hidden states, steered answers, per-token time.

Starts ``--servers`` llama.cpp rpc-server processes on localhost (built by scripts/build_rpc.sh),
re-runs itself with LLAMA_CPP_LIB_PATH pointed at the RPC-enabled library, and on the same prompts:
1. captures the residual stream (``l_out``) at every layer locally and through the servers, and
   prints the largest difference per layer relative to the state's norm;
2. generates greedy answers locally and through the servers: unsteered, with a control vector
   (llama.cpp adds it: ``--vector``, else a random direction), and with an edit written back from
   our eval callback (``--profile``: the exact AlignEZ edit; else the control vector's direction
   added by ``activation_edit``), and counts the answers that are identical;
3. times the unsteered generation both ways, the prompts together and one alone (one run after
   the other on the same cores: a ratio).
Each is also run locally with the CPU backend's weight repacking off (``Engine(repack_weights=False)``):
an rpc-server holds the weights plainly, so that local run is the one the servers match bit for bit.

usage: scripts/rpc_check.py -m qwen2.5-coder-0.5b-instruct \\
           --vector vectors/qwen2.5-coder-0.5b-instruct/french.gguf \\
           --profile vectors/qwen2.5-coder-0.5b-instruct/helpful.profile.gguf --json runs/rpc-check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignez_local.testing.rpc_servers import RpcServers, rpc_build, rpc_env  # noqa: E402  (no llama_cpp import)

PROMPTS = [
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "Explain recursion to a ten-year-old.",
    "How do I reverse a list in Python?",
]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--servers", type=int, default=2, help="rpc-server processes to split the layers over")
    ap.add_argument("--threads", type=int, default=1, help="threads of the local run and of each server")
    ap.add_argument("--cores", default=None, help="pin the servers to these cores, round robin (e.g. 0,1)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--vector", default=None, help="a control vector file (default: a random direction)")
    ap.add_argument("--profile", default=None, help="a steering profile (the exact edit)")
    ap.add_argument("--rpc-dir", default=None, help="scripts/build_rpc.sh's folder [ALIGNEZ_RPC_DIR or ~/.cache/alignez-local/rpc]")
    ap.add_argument("--json", default=None, help="write the figures and every answer here")
    ap.add_argument("--rpc", default=None, help=argparse.SUPPRESS)  # set by the re-run: the servers' endpoints
    return ap.parse_args()


KINDS = ("unsteered", "vector", "edit")


def r_answers(run: dict[str, object], kind: str) -> list[str]:
    answers = run["answers"]
    assert isinstance(answers, dict)
    return answers[kind]


def measure(args: argparse.Namespace, rpc: tuple[str, ...], repack: bool = True) -> dict[str, object]:
    from alignez_local.align.steering import Steering
    from alignez_local.llama.engine import Engine, Sampling
    from alignez_local.models import resolve_model

    t0 = time.monotonic()
    with Engine(resolve_model(args.model), n_threads=args.threads, n_ctx=2048, n_parallel=4, rpc_servers=rpc,
                repack_weights=repack) as eng:
        load_s = time.monotonic() - t0
        prompts = [eng.prompt(p) for p in PROMPTS]
        states = eng.capture(prompts, list(range(eng.n_layer)), site="l_out", reduce="mean")
        sampling = Sampling(max_tokens=args.tokens)
        t0 = time.monotonic()
        plain = eng.generate(prompts, sampling)
        gen_s = time.monotonic() - t0
        n_tok = sum(c.n_tokens for c in plain)
        t0 = time.monotonic()  # one answer alone: a chat's latency, where each token is a round trip per server
        alone = eng.generate(prompts[2:3], sampling)[0]
        alone_s = (time.monotonic() - t0) / max(1, alone.n_tokens)
        middle = eng.n_layer // 2
        if args.vector:
            vec_steer = Steering.from_specs(eng, vectors=[args.vector])
            vector_answers = vec_steer.generate(eng, prompts, sampling)
        else:
            direction = np.random.default_rng(0).standard_normal(eng.n_embd).astype(np.float32)
            direction *= 4.0 * float(np.linalg.norm(states[:, middle].mean(axis=0))) / float(np.linalg.norm(direction))
            with eng.control_vector({middle: direction}):
                vector_answers = eng.generate(prompts, sampling)
        if args.profile:
            edit_answers = Steering.from_specs(eng, profiles=[args.profile]).generate(eng, prompts, sampling)
        else:
            delta = (vec_steer.vector_sum(eng.n_layer) if args.vector else {middle: direction})
            with eng.activation_edit(lambda layer, x, _keys: x + delta[layer], sorted(delta), site="l_out"):
                edit_answers = eng.generate(prompts, sampling)
    return {"load_s": load_s, "generate_s": gen_s, "tokens": n_tok, "alone_s_per_token": alone_s, "states": states,
            "answers": {"unsteered": [c.text for c in plain], "vector": [c.text for c in vector_answers],
                        "edit": [c.text for c in edit_answers]}}


def rerun_with_library(args: argparse.Namespace) -> int:
    build = rpc_build(args.rpc_dir)
    if build is None:
        print("error: no RPC build of llama.cpp found; run scripts/build_rpc.sh first (or set ALIGNEZ_RPC_DIR)",
              file=sys.stderr)
        return 1
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    with RpcServers(build, args.servers, args.threads, cores) as servers:
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--rpc", servers.spec]
        return subprocess.run(argv, env=rpc_env(build)).returncode


def main() -> int:
    args = parse()
    if args.rpc is None:
        return rerun_with_library(args)
    from alignez_local.llama import rpc as rpc_backend

    endpoints = rpc_backend.parse_endpoints(args.rpc)
    print(f"model {args.model}; {len(endpoints)} rpc-server processes ({args.rpc}), {args.threads} thread(s) each; "
          f"{len(PROMPTS)} prompts, {args.tokens} tokens, greedy", flush=True)
    # Locally first: once the servers are registered, llama.cpp would also offer them to a local load.
    local = measure(args, ())
    plain = measure(args, (), repack=False)
    remote = measure(args, endpoints)
    report: dict[str, object] = {
        "model": args.model, "servers": len(endpoints), "threads": args.threads, "tokens": args.tokens,
        "n_prompts": len(PROMPTS), "library": os.environ.get("LLAMA_CPP_LIB_PATH"),
    }
    states = {name: r.pop("states") for name, r in (("local", local), ("plain", plain), ("rpc", remote))}
    for name, label in (("local", "local (default: weights repacked)"), ("plain", "local, weights not repacked")):
        a, b = states[name], states["rpc"]
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        rel = np.abs(a - b).max(axis=(0, 2)) / np.linalg.norm(a, axis=2).mean(axis=0)
        mine = {"local": local, "plain": plain}[name]
        same = {k: sum(x == y for x, y in zip(r_answers(mine, k), r_answers(remote, k))) for k in KINDS}
        print(f"rpc against {label}: states differ by at most {rel.max():.1e} of the state's norm "
              f"(per layer: {' '.join(f'{x:.0e}' for x in rel)}); identical answers: "
              + ", ".join(f"{k} {n}/{len(PROMPTS)}" for k, n in same.items()), flush=True)
        report[f"vs_{name}"] = {"state_rel_diff_per_layer": [float(x) for x in rel],
                                "state_rel_diff_max": float(rel.max()), "identical": same}
    for k in KINDS:
        print(f"  {k:9s} e.g. rpc: {r_answers(remote, k)[0][:70]!r}")
    per_tok = {name: float(r["generate_s"]) / max(1, int(r["tokens"]))  # type: ignore[arg-type]
               for name, r in (("local", local), ("plain", plain), ("rpc", remote))}
    print(f"generate: local {1000 * per_tok['local']:.1f} ms/token, local not repacked {1000 * per_tok['plain']:.1f}, "
          f"rpc {1000 * per_tok['rpc']:.1f} ({per_tok['rpc'] / per_tok['local']:.2f}x local); "
          f"load: local {local['load_s']:.1f} s, rpc {remote['load_s']:.1f} s")
    alone = {name: float(r["alone_s_per_token"]) for name, r in (("local", local), ("rpc", remote))}  # type: ignore[arg-type]
    print(f"one answer alone: local {1000 * alone['local']:.1f} ms/token, rpc {1000 * alone['rpc']:.1f} "
          f"({alone['rpc'] / alone['local']:.2f}x)")
    report.update(ms_per_token={k: 1000 * v for k, v in per_tok.items()},
                  ms_per_token_alone={k: 1000 * v for k, v in alone.items()}, local=local, plain=plain, rpc=remote)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

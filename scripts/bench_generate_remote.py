"""`steer --generate-url`'s generate stage against the local one: the same pairs? how long, with one
server and with two? (issue 30, part 2)

    .venv/bin/python scripts/bench_generate_remote.py --limit 16                       # llama-server, cores 0 and 1
    .venv/bin/python scripts/bench_generate_remote.py --server alignez --limit 16      # alignez serve
    .venv/bin/python scripts/bench_generate_remote.py --limit 16 --cores 0 --one-server    # pairs only, one core

The model writes its French pairs (steer's default axis and recipe, steer's sampling but greedy by
default: --temperature) for the first --limit built-in queries, four times into fresh files:
1. locally, as ``alignez steer`` does (one engine, --threads, its default 8 sequences);
2. through one server on the same GGUF (``--server llama-server``: ``~/llama-tools/bin/llama-server``,
   flash attention off like the local engine; ``--server alignez``: ``alignez serve --deterministic``),
   --concurrency requests in flight;
3. through two such servers (the fan-out), unless --one-server.
Each server runs --threads threads pinned with taskset to its own core of --cores (round robin), and
the client (this process) to the first; so with --cores 0 the two servers share one core and the
two-server time shows no gain (the figure to compare needs two free cores). Printed: each run's
generate-stage wall time side by side, and how many pairs are identical to the local run's (both
answers, byte for byte), with the first differing pair.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote_judge_check import server  # noqa: E402  (the one server-process helper of the scripts)

from alignez_local.align.axes import get_axis  # noqa: E402
from alignez_local.align.preferences import GenerationSettings, generate_preferences  # noqa: E402
from alignez_local.align.remote_text import RemoteWriter  # noqa: E402
from alignez_local.llama.engine import Engine  # noqa: E402
from alignez_local.models import resolve_model  # noqa: E402
from alignez_local.prompt_sets import select_queries  # noqa: E402
from alignez_local.settings import RuntimeSettings, open_engine  # noqa: E402
from alignez_local.testing import free_port  # noqa: E402

LLAMA_SERVER = Path.home() / "llama-tools" / "bin" / "llama-server"


def server_cmd(kind: str, model: Path, port: int, core: str, threads: int, parallel: int, ctx: int) -> list[str]:
    """Return the command line of one server pinned to ``core``."""
    pin = ["taskset", "-c", core, "nice"]
    if kind == "llama-server":
        # -fa off: the local engine runs without flash attention; -c is shared by the slots.
        return [*pin, str(LLAMA_SERVER), "-m", str(model), "--port", str(port), "-t", str(threads), "-tb", str(threads),
                "-np", str(parallel), "-c", str(ctx * parallel), "-fa", "off"]
    return [*pin, sys.executable, "-c", "from alignez_local.apps.cli import main; main()", "serve", "-m", str(model),
            "--port", str(port), "--threads", str(threads), "--parallel", str(parallel), "--ctx", str(ctx * parallel),
            "--deterministic"]


def pairs(path: Path) -> dict[str, dict[str, str]]:
    return {r["id"]: r["response"] for r in (json.loads(line) for line in path.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--server", choices=("llama-server", "alignez"), default="llama-server")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--response-tokens", type=int, default=GenerationSettings.response_tokens)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeat-penalty", type=float, default=GenerationSettings.repeat_penalty,
                    help="steer's 1.1 by default; 1 shows what is left without llama-server's prompt-in-window rule")
    ap.add_argument("--reuse-local", action="store_true", help="keep OUT/local.jsonl from an earlier run with the same settings")
    ap.add_argument("--local-control", type=int, default=0, metavar="N",
                    help="also run the local path with --parallel N: how many pairs the local path itself changes "
                         "when only its batch shapes do (the floor for the servers' counts)")
    ap.add_argument("--no-servers", action="store_true", help="only the local runs")
    ap.add_argument("--threads", type=int, default=1, help="threads of the local engine and of each server")
    ap.add_argument("--parallel", type=int, default=4, help="slots per server")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    ap.add_argument("--ctx", type=int, default=1024, help="context per server slot")
    ap.add_argument("--cores", default="0,1", help="cores the servers are pinned to, round robin")
    ap.add_argument("--one-server", action="store_true", help="skip the two-server run")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-generate-remote"))
    args = ap.parse_args()

    cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    os.sched_setaffinity(0, {int(cores[0])})
    model = resolve_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    axis = get_axis("french")
    queries = select_queries(None, args.limit, axis=axis.name)
    gs = GenerationSettings(temperature=args.temperature, response_tokens=args.response_tokens,
                            repeat_penalty=args.repeat_penalty)
    # The local path as `alignez steer` opens it (its default context and --parallel 8).
    engine = open_engine(str(model), RuntimeSettings(threads=args.threads))
    times: dict[str, float] = {}
    files: dict[str, Path] = {}

    def run(label: str, writer: RemoteWriter | None, local: Engine | None = None) -> None:
        path = args.out / f"{label.replace(' ', '-')}.jsonl"
        if writer is None and args.reuse_local and path.exists():
            files[label] = path
            return
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        generate_preferences(local or engine, queries, axis, path, gs, quiet=True, writer=writer)
        times[label], files[label] = time.perf_counter() - t0, path

    run("local", None)
    if args.local_control:
        with open_engine(str(model), RuntimeSettings(threads=args.threads, parallel=args.local_control)) as control:
            run(f"local p{args.local_control}", None, control)
    n_servers = 0 if args.no_servers else 1 if args.one_server else 2
    with ExitStack() as stack:
        urls = []
        for i in range(n_servers):
            port = free_port()
            cmd = server_cmd(args.server, model, port, cores[i % len(cores)], args.threads, args.parallel, args.ctx)
            urls.append(stack.enter_context(server(cmd, f"http://127.0.0.1:{port}", args.out / f"server{i + 1}.log")))
        for label, use in (("1 server", urls[:1]), ("2 servers", urls[:2]))[:n_servers]:
            writer = RemoteWriter(use, concurrency=args.concurrency)
            for line in writer.check_model(engine, args.model):
                print(line, file=sys.stderr)
            run(label, writer)

    local = pairs(files["local"])
    print(f"{args.model}, {len(queries)} French pairs, {args.response_tokens} tokens, temperature {args.temperature:g}, "
          f"repeat penalty {args.repeat_penalty:g}, "
          f"{args.server} (threads {args.threads}, slots {args.parallel}, cores {args.cores}), concurrency {args.concurrency}")
    print(f"{'run':12} {'generate s':>10} {'pairs identical':>16} {'answers identical':>18}")
    for label in files:
        got = pairs(files[label])
        same = sum(got.get(k) == v for k, v in local.items())
        answers = sum(got.get(k, {}).get(side) == v[side] for k, v in local.items() for side in v)
        shown = f"{times[label]:10.1f}" if label in times else f"{'(reused)':>10}"
        print(f"{label:12} {shown} {same:>9} of {len(local):<3} {answers:>11} of {2 * len(local)}")
    if n_servers == 2:
        print(f"two servers vs one: {times['1 server'] / times['2 servers']:.2f}x")
    for label in list(files)[1:]:
        got = pairs(files[label])
        diff = next((k for k, v in local.items() if got.get(k) != v), None)
        if diff is not None:
            for side in ("positive", "negative"):
                if local[diff][side] != got[diff][side]:
                    print(f"first difference ({label}, {side}):\n  local:  {local[diff][side]!r}\n  remote: {got[diff][side]!r}")
                    break
    engine.close()


if __name__ == "__main__":
    main()

"""Options shared by every command, named the same everywhere (-m/--model, --seed, --vector ...),
and grouped: each group of flags reaches the command as one value (a ``ModelRun``, a ``Sampling``,
a ``SteeringChoice``) built and checked here, so a command takes a handful of parameters, not
thirty flat ones, and the library types the CLI fills are the ones the Python API takes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from alignez_local.align.steering import DEFAULT_TOP_N
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Sampling
from alignez_local.llama.rpc import parse_endpoints
from alignez_local.models import DEFAULT_MODEL
from alignez_local.remote_api import DEFAULT_CONCURRENCY
from alignez_local.settings import ModelRun, RuntimeSettings

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def server_limits(flag: str, requests: str, timeout: float, per: str) -> list[tuple[str, Decorator]]:
    """Return ``grouped``'s entries for FLAG-concurrency and FLAG-timeout (``--judge``, ``--generate``):
    how many ``requests`` each FLAG-url server has in flight, and how long one may take (``per``)."""
    key = flag.lstrip("-").replace("-", "_")
    return [
        (f"{key}_concurrency", click.option(f"{flag}-concurrency", type=click.IntRange(1, 64), default=DEFAULT_CONCURRENCY,
                                            show_default=True, help=f"{requests} in flight per {flag}-url server.")),
        (f"{key}_timeout", click.option(f"{flag}-timeout", type=click.FloatRange(0, min_open=True), default=timeout,
                                        show_default=True, help=f"Seconds a {flag}-url server may take per {per} "
                                                                "(retried with backoff, then the run stops).")),
    ]


def grouped(name: str, build: Callable[..., Any], *options: tuple[str, Decorator]) -> Decorator:
    """Return a decorator that adds ``options`` (each: its parameter name and its ``click.option``)
    to a command and hands the command one argument ``name`` = ``build(**their values)``."""
    keys = [key for key, _ in options]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = build(**{k: kwargs.pop(k) for k in keys})
            return f(*args, **kwargs)

        for _, option in reversed(options):
            command = option(command)
        return command

    return decorate


def _model_run(model: str, threads: int | None, n_ctx: int, gpu_layers: int, parallel: int, verbose: bool,
               rpc: tuple[str, ...]) -> ModelRun:
    servers = with_flag("--rpc", parse_endpoints, rpc) if rpc else ()
    return ModelRun(model, RuntimeSettings(threads=threads, n_ctx=n_ctx, gpu_layers=gpu_layers, parallel=parallel,
                                           verbose=verbose, rpc=servers))


model_options = grouped(
    "model", _model_run,
    ("model", click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
                           help="GGUF file or bundled name (smollm2-135m-instruct, gemma3-270m, qwen2.5-coder-0.5b-instruct).")),
    ("threads", click.option("--threads", type=click.IntRange(1, 512), default=None, help="CPU threads [physical cores].")),
    ("n_ctx", click.option("--ctx", "n_ctx", type=click.IntRange(64, 1 << 20), default=4096, show_default=True,
                           help="Context size in tokens.")),
    ("gpu_layers", click.option("--gpu-layers", type=click.IntRange(0, 10000), default=0, show_default=True,
                                help="Layers to offload to a GPU build.")),
    ("parallel", click.option("--parallel", type=click.IntRange(1, 64), default=8, show_default=True,
                              help="Sequences decoded together in one batch.")),
    ("verbose", click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log.")),
    ("rpc", click.option("--rpc", multiple=True, metavar="HOST:PORT[,...]",
                         help="Run the model's layers on llama.cpp rpc-server processes (needs an RPC build: "
                              "scripts/build_rpc.sh).")),
)
"""-m/--model and the llama.cpp runtime flags -> ``model: ModelRun``."""


# The engine's messages name parameters (n_ctx, max_tokens ...); the user typed flags.
PARAMETER_FLAGS = {
    "n_ctx": "--ctx", "n_parallel": "--parallel", "n_threads": "--threads", "n_gpu_layers": "--gpu-layers",
    "max_tokens": "--max-tokens", "top_p": "--top-p", "top_k": "--top-k", "repeat_penalty": "--repeat-penalty",
}
# Plain words are only a parameter at the start of a message ("temperature 9 is out of range").
LEADING_FLAGS = {"temperature": "--temperature", "seed": "--seed"}
_PARAMETER_RE = re.compile(r"(?<![\w-])(" + "|".join(PARAMETER_FLAGS) + r")\b")


def in_flags(message: str) -> str:
    """Return an error message with the engine's parameter names replaced by the CLI flags that set them."""
    message = _PARAMETER_RE.sub(lambda m: PARAMETER_FLAGS[m.group(1)], message)
    word, sep, rest = message.partition(" ")
    return f"{LEADING_FLAGS[word]}{sep}{rest}" if word in LEADING_FLAGS else message


def with_flag(flag: str, parse: Callable[..., Any], *args: Any) -> Any:
    """Return ``parse(*args)``; a bad value's error line also names the flag it came from."""
    try:
        return parse(*args)
    except AlignezError as err:
        raise AlignezError(f"{flag}: {err}") from None


def _sampling(temperature: float, top_p: float, top_k: int, seed: int, max_tokens: int, repeat_penalty: float) -> Sampling:
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
                    repeat_penalty=repeat_penalty).check()


def sampling_options(max_tokens: int = 200, temperature: float = 0.0) -> Decorator:
    """--temperature, --top-p, --top-k, --seed, --max-tokens, --repeat-penalty -> ``sampling: Sampling`` (checked)."""
    return grouped(
        "sampling", _sampling,
        ("temperature", click.option("--temperature", type=float, default=temperature, show_default=True, help="0 = greedy.")),
        ("top_p", click.option("--top-p", type=float, default=1.0, show_default=True)),
        ("top_k", click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")),
        ("seed", click.option("--seed", type=int, default=0, show_default=True)),
        ("max_tokens", click.option("--max-tokens", type=int, default=max_tokens, show_default=True)),
        ("repeat_penalty", click.option("--repeat-penalty", type=float, default=1.1, show_default=True, help="1 = off.")),
    )


@dataclass(frozen=True)
class SteeringChoice:
    """The steering files a command was given, as the user typed them: ``Steering.from_specs`` (and
    ``specs.parse_steering_spec``) read them, so every command reads them the same way."""

    vectors: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    layers: str | None = None
    top_n: int = DEFAULT_TOP_N


steering_options = grouped(
    "steering", SteeringChoice,
    ("vectors", click.option("--vector", "vectors", multiple=True, metavar="FILE[:STRENGTH]",
                             help="A llama.cpp control vector (ours, cvector-generator's, repeng's); repeatable. "
                                  "No STRENGTH: the file's calibrated strength, else 1.")),
    ("profiles", click.option("--profile", "profiles", multiple=True, metavar="FILE[:STRENGTH]",
                              help="An alignez steering profile, applied with the exact AlignEZ edit; repeatable. "
                                   "No STRENGTH: the file's calibrated strength, else 1.")),
    ("layers", click.option("--layers", default=None, metavar="A-B", help="Only steer layers A..B (inclusive).")),
    ("top_n", click.option("--top-n", type=int, default=DEFAULT_TOP_N, show_default=True,
                           help="Layers the exact edit picks per prompt.")),
)
"""--vector, --profile, --layers, --top-n -> ``steering: SteeringChoice``."""

"""Options shared by every command, named the same everywhere (-m/--model, --seed, --vector ...)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click

from alignez_local.align.steering import DEFAULT_TOP_N
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.models import DEFAULT_MODEL
from alignez_local.settings import RuntimeSettings
from alignez_local.settings import open_engine as open_engine_with


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add -m/--model and the llama.cpp runtime options."""
    decorators = [
        click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
                     help="GGUF file or bundled name (smollm2-135m-instruct, gemma3-270m, qwen2.5-coder-0.5b-instruct)."),
        click.option("--threads", type=click.IntRange(1, 512), default=None, help="CPU threads [physical cores]."),
        click.option("--ctx", "n_ctx", type=click.IntRange(64, 1 << 20), default=4096, show_default=True, help="Context size in tokens."),
        click.option("--gpu-layers", type=click.IntRange(0, 10000), default=0, show_default=True, help="Layers to offload to a GPU build."),
        click.option("--parallel", type=click.IntRange(1, 64), default=8, show_default=True, help="Sequences decoded together in one batch."),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log."),
    ]
    return functools.reduce(lambda acc, d: d(acc), reversed(decorators), f)


def runtime_settings(threads: int | None, n_ctx: int, gpu_layers: int, parallel: int, verbose: bool) -> RuntimeSettings:
    """Return the run settings named by the --threads, --ctx, --gpu-layers, --parallel and -v flags."""
    return RuntimeSettings(threads=threads, n_ctx=n_ctx, gpu_layers=gpu_layers, parallel=parallel, verbose=verbose)


def open_engine(model: str, threads: int | None, n_ctx: int, gpu_layers: int, parallel: int, verbose: bool) -> Engine:
    """Return an engine on ``model`` opened with the run settings of the model_options flags."""
    return open_engine_with(model, runtime_settings(threads, n_ctx, gpu_layers, parallel, verbose))


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


def sampling_options(max_tokens: int = 200, temperature: float = 0.0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add --temperature, --top-p, --top-k, --seed, --max-tokens, --repeat-penalty."""

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        decorators = [
            click.option("--temperature", type=float, default=temperature, show_default=True, help="0 = greedy."),
            click.option("--top-p", type=float, default=1.0, show_default=True),
            click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--max-tokens", type=int, default=max_tokens, show_default=True),
            click.option("--repeat-penalty", type=float, default=1.1, show_default=True, help="1 = off."),
        ]
        return functools.reduce(lambda acc, d: d(acc), reversed(decorators), f)

    return wrap


def make_sampling(temperature: float, top_p: float, top_k: int, seed: int, max_tokens: int,
                  repeat_penalty: float, stop: tuple[str, ...] = ()) -> Sampling:
    """Return checked sampling settings."""
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
                    repeat_penalty=repeat_penalty, stop=stop).check()


def steering_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --vector FILE[:STRENGTH], --profile FILE[:STRENGTH], --layers A-B, --top-n.

    --vector and --profile arrive as the text the user typed; ``Steering.from_specs`` parses them
    (with ``specs.parse_steering_spec``), so every command reads them the same way.
    """
    decorators = [
        click.option("--vector", "vectors", multiple=True, metavar="FILE[:STRENGTH]",
                     help="A llama.cpp control vector (ours, cvector-generator's, repeng's); repeatable. "
                          "No STRENGTH: the file's calibrated strength, else 1."),
        click.option("--profile", "profiles", multiple=True, metavar="FILE[:STRENGTH]",
                     help="An alignez steering profile, applied with the exact AlignEZ edit; repeatable. "
                          "No STRENGTH: the file's calibrated strength, else 1."),
        click.option("--layers", default=None, metavar="A-B", help="Only steer layers A..B (inclusive)."),
        click.option("--top-n", type=int, default=DEFAULT_TOP_N, show_default=True,
                     help="Layers the exact edit picks per prompt."),
    ]
    return functools.reduce(lambda acc, d: d(acc), reversed(decorators), f)

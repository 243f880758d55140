"""``alignez serve``: the OpenAI-compatible server (needs the ``serve`` extra).

The HTTP stack is imported only when the command runs, so the rest of the CLI works without it.
"""

from __future__ import annotations

import os
import signal

from typing import Any

import click

from alignez_local.align.steering import DEFAULT_TOP_N
from alignez_local.apps.cli_options import grouped, model_options
from alignez_local.errors import AlignezError
from alignez_local.settings import ModelRun


def _http_stack() -> None:
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise AlignezError(
            f"alignez serve needs the HTTP stack ({err.name} is missing); install it with: pip install 'alignez-local[serve]'"
        ) from None


def _server_class() -> type:
    import uvicorn

    class StopOnSignal(uvicorn.Server):
        """A uvicorn server for which SIGTERM / Ctrl-C simply mean "stop".

        uvicorn re-raises the signal after its graceful shutdown, so the process would then die by
        SIGTERM or end in a KeyboardInterrupt; here stopping is the whole job, so it ends normally.
        A second Ctrl-C still forces the exit without waiting for open connections.
        """

        def handle_exit(self, sig: int, frame: object) -> None:
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

    return StopOnSignal


def _limits(max_body_mb: float, max_messages: int, max_prompt_tokens: int | None, completions_specials: bool) -> Any:
    from alignez_local.apps.serve.schemas import Limits  # the HTTP stack loads only when serve runs

    return Limits(int(max_body_mb * 1e6), max_messages, max_prompt_tokens, completions_specials)


limit_options = grouped(
    "limits", _limits,
    ("max_body_mb", click.option("--max-body-mb", type=click.FloatRange(0.001, 1024), default=4, show_default=True,
                                 help="Largest request body in MB (413 beyond, refused before it is read).")),
    ("max_messages", click.option("--max-messages", type=click.IntRange(1, 1 << 20), default=2048, show_default=True,
                                  help="Most messages in one chat request.")),
    ("max_prompt_tokens", click.option("--max-prompt-tokens", type=click.IntRange(1, 1 << 20), default=None,
                                       help="Most prompt tokens in one request  [default: the context, --ctx]")),
    ("completions_specials", click.option(
        "--completions-specials/--no-completions-specials", default=True, show_default=True,
        help="Read control-token text (<|im_end|> ...) in a /v1/completions prompt as control tokens, as llama-server "
             "does; off, it is plain text. Chat message content is always plain text.")),
)
"""The server's request limits -> ``limits: Limits`` (docs/serve.md)."""


def fast_paths(flash_attn: bool | None, cache_prompt: bool | None, deterministic: bool) -> tuple[bool, bool]:
    """Return (flash attention, prompt reuse) for the server: both on unless --deterministic.

    The server's defaults differ from the rest of the toolkit's (``RuntimeSettings.flash_attn`` is
    off): steer and eval compare answers across batches, a server is compared with llama-server.
    """
    if deterministic:
        asked = [f for f, on in (("--flash-attn", flash_attn), ("--cache-prompt", cache_prompt)) if on]
        if asked:
            raise AlignezError(f"--deterministic turns {' and '.join(asked)} off; give one or the other")
        return False, False
    return flash_attn is not False, cache_prompt is not False


@click.command("serve")
@model_options
@click.option("--vector", "vectors", multiple=True, metavar="[NAME=]FILE[:STRENGTH]",
              help="A control vector requests can choose by NAME (default: the file name); repeatable.")
@click.option("--profile", "profiles", multiple=True, metavar="[NAME=]FILE[:STRENGTH]",
              help="A steering profile (exact AlignEZ edit) requests can choose by NAME; repeatable.")
@click.option("--top-n", type=click.IntRange(1, 1000), default=DEFAULT_TOP_N, show_default=True,
              help="Layers the exact edit picks per prompt.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0 = any free port).")
@click.option("--api-key", default=lambda: os.environ.get("ALIGNEZ_API_KEY"), metavar="KEY",
              help="Require 'Authorization: Bearer KEY' [env ALIGNEZ_API_KEY].")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True,
              help="Tokens to generate when a request gives no max_tokens.")
@click.option("--batch-wait-ms", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="How long an idle server waits after a first request for others to start with it "
                   "(later requests join the running decode anyway).")
@click.option("--flash-attn/--no-flash-attn", default=None,
              help="llama.cpp's flash attention, as llama-server uses it on CPU  [default: on; off with --deterministic]")
@click.option("--cache-prompt/--no-cache-prompt", default=None,
              help="Let a request start from the prompt cells an earlier request steered alike left in its slot, as "
                   "llama-server does: shared system prompts are read once per slot  [default: on; off with --deterministic]")
@click.option("--deterministic", is_flag=True,
              help="Flash attention and prompt reuse off: an answer's bits then depend only on the batch shapes, never on "
                   "what its neighbours or the requests before it were (slower; docs/serve.md says by how much).")
@limit_options
def serve_command(
    model: ModelRun,
    vectors: tuple[str, ...], profiles: tuple[str, ...], top_n: int,
    host: str, port: int, api_key: str | None, max_tokens: int, batch_wait_ms: int, flash_attn: bool | None,
    cache_prompt: bool | None, deterministic: bool, limits: Any,
) -> None:
    """Serve the OpenAI API; every request picks its own steering, all decoded together.

    \b
    alignez serve -m smollm2-135m-instruct --vector french=vectors/smollm2-135m-instruct/french.gguf --port 8080
    curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages":[{"role":"user","content":"Hi"}],"steering":{"french":0.05}}'

    \b
    A request's "steering" field: {"NAME": strength, ...} chooses vectors/profiles and strengths,
    0 or {} means unsteered, and no field means the server's defaults (each file at the strength
    given here, else its own default, else 1). GET /v1/steering lists what is loaded.
    Ctrl-C or SIGTERM stops the server cleanly. Limits and the control-token policy: docs/serve.md.
    """
    _http_stack()
    import uvicorn

    from alignez_local.apps.serve.app import ServeConfig, create_app
    from alignez_local.apps.serve.steering import SteeringSet

    if api_key is not None and not api_key.strip():
        raise AlignezError("--api-key is empty; give a key or leave the option out")
    flash_attn, cache_prompt = fast_paths(flash_attn, cache_prompt, deterministic)
    engine = ModelRun(model.model, model.runtime.with_(flash_attn=flash_attn)).open()
    parallel, verbose = model.runtime.parallel, model.runtime.verbose
    app = None
    try:
        steering, warnings = SteeringSet.load(engine, vectors, profiles, top_n)
        for w in warnings:
            click.echo(f"warning: {w}", err=True)
        model_id = engine.path.stem
        app = create_app(engine, steering, ServeConfig(model_id, api_key, max_tokens, batch_wait_ms / 1000, cache_prompt,
                                                                  plan_every_job=deterministic, limits=limits),
                         parallel)
        names = ", ".join(f"{n} ({s.kind}, default {s.default_strength:g})" for n, s in steering.items.items()) or "none"
        mode = "deterministic" if deterministic else (
            f"flash attention {'on' if flash_attn else 'off'}, prompt cache {'on' if cache_prompt else 'off'}")
        click.echo(f"alignez serve: {model_id} on http://{host}:{port}/v1 ({parallel} slots, {mode}); steering: {names}",
                   err=True)
        config = uvicorn.Config(app, host=host, port=port, log_level="debug" if verbose else "warning",
                                timeout_graceful_shutdown=5)
        _server_class()(config).run()
        click.echo("alignez serve: stopped", err=True)
    finally:
        # The worker has ended (the app's lifespan stops it) unless a batch ignored the stop.
        if app is None or not app.state.worker.alive:
            engine.close()

"""The ``alignez`` command: a thin layer over the Python API."""

from __future__ import annotations

import sys

import click

from alignez_local.version import __version__
from alignez_local.apps.cli_options import in_flags
from alignez_local.errors import AlignezError
from alignez_local.llama.interrupt import EXIT_CTRL_C, SigtermSeen, Stopped, sigterm_as_ctrl_c

# The long commands stop on SIGTERM (kill, a job scheduler, a container's stop) as on Ctrl-C: the
# same line, and the shell's exit code for the signal. Not chat (Ctrl-C there stops one answer)
# nor serve (uvicorn owns its signals).
SIGTERM_AS_CTRL_C = frozenset({"steer", "generate", "fit", "export", "eval"})
_SIGTERM = "alignez.sigterm"


class AlignezGroup(click.Group):
    """A click group that turns our errors into one line and Ctrl-C (or SIGTERM) into a clean stop."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[no-untyped-def]
        name, cmd, rest = super().resolve_command(ctx, args)
        if name in SIGTERM_AS_CTRL_C:
            ctx.meta[_SIGTERM] = ctx.with_resource(sigterm_as_ctrl_c())  # until the command has ended
        return name, cmd, rest

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except AlignezError as err:
            click.echo(f"error: {in_flags(str(err))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as stop:
            sigterm: SigtermSeen | None = ctx.meta.get(_SIGTERM)
            word = sigterm.word() if sigterm else "interrupted"
            # Output files are only ever replaced whole (atomic rename), so none is half-written.
            detail = stop.line if isinstance(stop, Stopped) else "no output file was written or changed"
            click.echo(f"\n{word}: {detail}", err=True)
            sys.exit(sigterm.exit_code if sigterm else EXIT_CTRL_C)
        except BrokenPipeError:
            sys.exit(1)


@click.group(cls=AlignezGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alignez")
def main() -> None:
    """Free self-alignment (AlignEZ) and activation steering for local GGUF models.

    \b
    alignez steer                       # self-generated data -> profile + control vector
    alignez chat --profile P.gguf       # chat with the steered model
    alignez eval --profile P.gguf       # does steering help? (local judge)
    """


def _register() -> None:
    from alignez_local.apps.cli_align import align_commands
    from alignez_local.apps.cli_chat import chat
    from alignez_local.apps.cli_eval import eval_command
    from alignez_local.apps.serve.command import serve_command

    for cmd in [*align_commands, chat, eval_command, serve_command]:
        main.add_command(cmd)


_register()

if __name__ == "__main__":
    main()

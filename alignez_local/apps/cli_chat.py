"""``alignez chat``: a thin terminal around ``chat.ChatSession`` (interactive, piped or one-shot)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from alignez_local.apps.chat import Answer, ChatSession
from alignez_local.apps.cli_options import SteeringChoice, in_flags, model_options, sampling_options, steering_options
from alignez_local.llama.engine import Sampling
from alignez_local.settings import ModelRun
from alignez_local.errors import AlignezError


class _Terminal:
    """Shows answers and command output: streamed text, or one JSON object per answer."""

    def __init__(self, session: ChatSession, as_json: bool, interactive: bool) -> None:
        self.session = session
        self.as_json = as_json
        # Chat-only extras (length notes) would spoil one-shot output that scripts capture.
        self.chatty = interactive

    # --- output --------------------------------------------------------------------------------

    def info(self, lines: list[str]) -> None:
        """Print command output; on stderr in --json mode so stdout stays one JSON object per line."""
        for line in lines:
            click.echo(line, err=self.as_json)

    @staticmethod
    def error(message: str) -> None:
        """Print one error line on stderr."""
        click.echo(f"error: {in_flags(message)}", err=True)

    def stream(self, piece: str) -> None:
        """Print a piece of an answer as soon as it is generated (text mode only)."""
        if not self.as_json:
            click.echo(piece, nl=False)

    def done(self, ans: Answer, compare: bool = False) -> None:
        """Finish showing an answer: end its line, or print its JSON record."""
        if self.as_json:
            record: dict[str, Any] = {
                "prompt": ans.prompt,
                "answer": ans.text,
                "steered": ans.steered,
                "finish_reason": ans.finish_reason,
                "n_tokens": ans.n_tokens,
                "settings": self.session.settings(),
            }
            if compare:
                record["compare"] = True
            click.echo(json.dumps(record, ensure_ascii=False))
            return
        if ans.finish_reason == "interrupted":
            click.echo("\n[stopped]")
            return
        click.echo()
        if ans.finish_reason == "length" and self.chatty:
            click.echo(f"[cut at --max-tokens {self.session.sampling.max_tokens}]")

    def header(self, steered: bool) -> None:
        """Print the header before each answer of /compare (text mode only)."""
        if self.as_json:
            return
        if not steered:
            click.echo("--- unsteered ---")
            return
        st = self.session.steering
        parts = [f"{s.name} x{s.strength:g}" for s in st.slots if s.strength != 0]
        if st.layer_range:
            parts.append(f"layers {st.layer_range[0]}-{st.layer_range[1]}")
        click.echo(f"--- steered ({', '.join(parts)}) ---")

    # --- one line of input ---------------------------------------------------------------------

    def run_line(self, line: str) -> str:
        """Return "ok", "error", "interrupted" or "quit" after handling one message or /command."""
        if line.startswith("/") and not line.startswith("//"):
            res = self.session.handle_command(line)
            if res.error:
                self.error(res.error)
                return "error"
            self.info(res.lines)
            if res.action == "quit":
                return "quit"
            if res.action == "compare":
                return self.compare()
            return "ok"
        return self.ask(line[1:] if line.startswith("//") else line)

    def ask(self, text: str) -> str:
        """Return the status after answering ``text`` (streamed), as one turn of the conversation."""
        try:
            ans = self.session.ask(text, on_token=self.stream)
        except AlignezError as err:
            self.error(str(err))
            return "error"
        self.done(ans)
        return "interrupted" if ans.finish_reason == "interrupted" else "ok"

    def compare(self) -> str:
        """Return the status after showing the last question answered unsteered, then steered."""
        try:
            answers = self.session.compare(
                on_token=self.stream, on_start=self.header, on_done=lambda a: self.done(a, compare=True)
            )
        except AlignezError as err:
            self.error(str(err))
            return "error"
        return "interrupted" if answers and answers[-1].finish_reason == "interrupted" else "ok"


def _interactive(term: _Terminal) -> None:
    """Chat on the terminal until /quit or Ctrl-D; Ctrl-C stops only the answer being written."""
    try:
        import readline  # noqa: F401 - importing it gives input() line editing and history
    except ImportError:
        pass
    s = term.session
    e = s.engine
    kind = "chat template" if e.is_chat else "base model, plain User:/Assistant: format"
    term.info([f"alignez chat: {e.name} ({e.arch}, {e.n_layer} layers, {kind})"])
    term.info(["  " + line for line in s.describe()])
    term.info(["Type /help for commands. Ctrl-C stops an answer; Ctrl-D or /quit leaves."])
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-D or /quit leaves)")
            continue
        if not line.strip():
            continue
        try:
            if term.run_line(line) == "quit":
                return
        except KeyboardInterrupt:
            # Ctrl-C outside the model's decoding (while printing, saving ...): same promise.
            click.echo("\n[stopped]")


def _piped(term: _Terminal) -> bool:
    """Return True when every line of stdin (one message or /command each) was handled without error."""
    ok = True
    for raw in sys.stdin:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if not term.as_json:
            click.echo(f"> {line}")
        status = term.run_line(line)
        if status == "interrupted":
            raise KeyboardInterrupt  # nobody is there to type the next line: stop the whole run
        if status == "quit":
            break
        ok = ok and status == "ok"
    return ok


@click.command("chat")
@model_options
@sampling_options(max_tokens=256, temperature=0.7)
@steering_options
@click.option("-s", "--system", default=None, metavar="TEXT", help="System prompt for the whole chat.")
@click.option("--prompt", "prompt_text", default=None, metavar="TEXT", help="Answer TEXT once, print the answer and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per answer instead of streaming text.")
def chat(model: ModelRun, sampling: Sampling, steering: SteeringChoice, system: str | None, prompt_text: str | None,
         as_json: bool) -> None:
    """Chat with a model steered by control vectors and profiles, adjustable while you chat.

    \b
    alignez chat --vector happy.gguf:4
    alignez chat --vector a.gguf:2 --vector b.gguf:-1 --profile p.gguf:0.5 --layers 8-20
    alignez chat --profile p.gguf       # the file's calibrated strength, else 1
    alignez chat --vector happy.gguf:4 --prompt "Describe your day." --json
    printf 'Describe your day.\\n/compare\\n' | alignez chat --vector happy.gguf:4

    \b
    In the chat:
      /strength X         set the strength of every vector and profile
      /strength NAME X    set one (NAME = its file name without .gguf)
      /on  /off           switch steering on or off
      /layers A-B | all   steer only layers A..B, or every layer again
      /vectors            what is loaded: strengths (and where each came from), layers, on/off
      /compare            your last message again, unsteered then steered
      /reset              forget the conversation (settings stay)
      /save FILE          the conversation and every setting as JSON
      /help  /quit

    Every answer is sampled with the same --seed, so /off followed by the same question gives
    exactly the unsteered answer, and /compare shows only what the steering changes. The whole
    conversation is re-read for every answer, so new settings apply from the next answer on.

    When stdin is not a terminal, each line is one message and lines starting with / are commands.
    A line that fails is reported on stderr, the rest still run, and the exit status is then 1.
    Ctrl-C stops the answer being written (interactively; otherwise it ends the run); Ctrl-D or
    /quit leaves.
    """
    if prompt_text is not None and not prompt_text.strip():
        raise AlignezError("--prompt is empty; give the message to answer")
    with model.open() as engine:
        session = ChatSession.from_specs(
            engine, steering.vectors, steering.profiles, steering.layers, steering.top_n, sampling, system,
            on_note=lambda msg: click.echo(msg, err=True)
        )
        interactive = prompt_text is None and sys.stdin.isatty()
        term = _Terminal(session, as_json, interactive)
        if prompt_text is not None:
            status = term.ask(prompt_text)
            if status == "interrupted":
                raise KeyboardInterrupt
            if status == "error":
                sys.exit(1)
        elif interactive:
            _interactive(term)
        elif not _piped(term):
            sys.exit(1)

"""A multi-turn chat with a steered model: history, live steering changes, compare and save.

``ChatSession`` holds everything a chat needs (engine, history, steering, sampling, system prompt)
and knows nothing about terminals; ``cli_chat`` is the thin command around it.

Design notes (the why):
- Every answer is generated from the WHOLE history rendered with the model's chat template, and
  the engine prefills from an empty KV cache on every call. Nothing computed under one steering
  setting is ever reused under another, so ``/off``, ``/strength`` and ``/layers`` take effect on
  the very next answer.
- Every answer is sampled with the same seed. The only thing that differs between two answers to
  the same conversation is then the steering: ``/off`` followed by the same question gives exactly
  the unsteered answer, and ``/compare`` shows what the steering changes and nothing else.
- Ctrl-C while answering stops that answer only: the partial answer and its question stay out of
  the history, so the next turn sees a clean conversation. (The engine turns a Ctrl-C during a
  decode into a clean abort followed by KeyboardInterrupt.)
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.errors import AlignezError
from alignez_local.fileio import write_json
from alignez_local.align.steering import DEFAULT_TOP_N, Steering
from alignez_local.specs import SteeringSpec, parse_layer_range, parse_strength

TRANSCRIPT_FORMAT = "alignez-chat"
# Version 2: profiles say "strength" (was "weight") and every slot says where its strength came from.
TRANSCRIPT_VERSION = 2
SET_IN_CHAT = "set with /strength"  # the origin of a strength changed during the chat

HELP_LINES = [
    "/strength X         set the strength of every vector and profile to X",
    "/strength NAME X    set one of them (NAME = its file name without .gguf, see /vectors)",
    "/on  /off           switch steering on or off (strengths are kept)",
    "/layers A-B | all   steer only layers A..B, or every layer again",
    "/vectors            show what is loaded: strengths, layers, on/off",
    "/compare            answer your last message again, unsteered then steered (same seed)",
    "/reset              forget the conversation (settings stay)",
    "/save FILE          write the conversation and every setting to FILE as JSON",
    "/help               this list",
    "/quit               leave (Ctrl-D too)",
    "Start a message with // to send text that itself begins with /.",
]

TokenCallback = Callable[[str], None]


@dataclass
class Answer(Completion):
    """One chat answer: the engine's completion plus what was asked and whether it was steered."""

    prompt: str = ""
    steered: bool = False


@dataclass
class CommandResult:
    """What an in-chat command produced: lines to show, an error line, and an action for the caller."""

    lines: list[str] = field(default_factory=list)
    error: str | None = None
    action: str | None = None  # "quit" or "compare"; the caller does the talking to the user


class ChatSession:
    """A conversation with one model under adjustable steering."""

    def __init__(
        self,
        engine: Engine,
        steering: Steering | None = None,
        sampling: Sampling = Sampling(),
        system: str | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.steering = steering if steering is not None else Steering()
        # Base models have no end-of-turn token: without these stops they write the user's next
        # line themselves.
        if not engine.is_chat and not sampling.stop:
            sampling = dataclasses.replace(sampling, stop=engine.default_stop)
        self.sampling = sampling.check()
        self.system = system or None
        self.messages: list[dict[str, str]] = []
        # The last question asked and the history it was asked after (for /compare). Kept apart from
        # ``messages`` because an interrupted question is not in the history but can be compared.
        self.last_turn: tuple[list[dict[str, str]], str] | None = None
        self.on_note = on_note or (lambda _msg: None)

    @classmethod
    def from_specs(
        cls,
        engine: Engine,
        vectors: Sequence[str | SteeringSpec] = (),
        profiles: Sequence[str | SteeringSpec] = (),
        layers: str | None = None,
        top_n: int | None = None,
        sampling: Sampling = Sampling(),
        system: str | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> "ChatSession":
        """Return a session steered by ``FILE[:STRENGTH]`` specs (warnings go to on_note)."""
        st = Steering.from_specs(engine, vectors, profiles, layers, top_n or DEFAULT_TOP_N)
        notes = list(st.warnings)
        for slot in st.slots:
            obj = slot.vector if hasattr(slot, "vector") else slot.profile
            if (w := obj.calibration_warning()) is not None:
                notes.append(f"{slot.name}: {w}")
            # A strength chosen under a system prompt (steer --system) holds under that prompt.
            measured = (obj.calibration or {}).get("system")
            if isinstance(measured, str) and measured != (system or None):
                notes.append(f"{slot.name}: its strength was chosen under the system prompt {measured!r}; "
                             f"add --system {shlex.quote(measured)} to chat as it was measured")
        for w in notes:
            (on_note or (lambda _m: None))(f"warning: {w}")
        return cls(engine, st, sampling, system, on_note=on_note)

    # --- answering -----------------------------------------------------------------------------

    def ask(self, text: str, steered: bool | None = None, on_token: TokenCallback | None = None) -> Answer:
        """Return the model's answer to ``text`` after the history, and add both to the history.

        ``steered`` None follows the session's on/off switch; True or False forces it for this
        answer. ``on_token`` receives the answer's text as it is generated. Ctrl-C stops the answer:
        it comes back with finish_reason "interrupted" and is NOT added to the history.
        """
        if not text.strip():
            raise AlignezError("an empty message cannot be answered; type some text")
        context = list(self.messages)
        self.last_turn = (context, text)
        answer = self._answer(context, text, steered, on_token)
        if answer.finish_reason != "interrupted":
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.text}]
        return answer

    def compare(
        self,
        on_token: TokenCallback | None = None,
        on_start: Callable[[bool], None] | None = None,
        on_done: Callable[[Answer], None] | None = None,
    ) -> list[Answer]:
        """Return the last question answered again unsteered, then steered (same seed, history unchanged).

        The steered answer uses the current strengths and layers even when steering is switched
        off. ``on_start(steered)`` is called before each answer and ``on_done(answer)`` after it
        (for headers and line ends). A Ctrl-C stops the comparison; the list then ends with the
        interrupted answer.
        """
        if self.last_turn is None:
            raise AlignezError("nothing to compare yet: ask something first")
        if not dataclasses.replace(self.steering, enabled=True).active:
            raise AlignezError("nothing to compare: no vector or profile with a non-zero strength is loaded")
        context, text = self.last_turn
        out: list[Answer] = []
        for steered in (False, True):
            if on_start is not None:
                on_start(steered)
            out.append(self._answer(context, text, steered, on_token))
            if on_done is not None:
                on_done(out[-1])
            if out[-1].finish_reason == "interrupted":
                break
        return out

    def _answer(self, context: list[dict[str, str]], text: str, steered: bool | None, on_token: TokenCallback | None) -> Answer:
        """Return one answer to ``text`` after ``context``, streamed to ``on_token``; history untouched."""
        prompt = self.engine.format_chat(self._fit(context, text))
        st = self.steering if steered is None else dataclasses.replace(self.steering, enabled=steered)
        parts: list[str] = []

        def stream(_key: int, piece: str) -> None:
            # Models often open with a space or newline after the template's "assistant" header.
            if not parts:
                piece = piece.lstrip()
                if not piece:
                    return
            parts.append(piece)
            if on_token is not None:
                on_token(piece)

        try:
            [done] = st.generate(self.engine, [prompt], self.sampling, on_token=stream)
        except KeyboardInterrupt:
            partial = "".join(parts)
            n = len(self.engine.tokenize(partial, add_bos=False)) if partial else 0
            return Answer(partial, n, "interrupted", len(self.engine.tokenize(prompt)), prompt=text, steered=st.active)
        return Answer(
            done.text.strip(), done.n_tokens, done.finish_reason, done.n_prompt_tokens, prompt=text, steered=st.active
        )

    def _fit(self, context: list[dict[str, str]], text: str) -> list[dict[str, str]]:
        """Return the messages to render, leaving out the oldest turns if the prompt would overflow the context."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": text}]
        room = self.engine.n_ctx - self.sampling.max_tokens
        dropped = 0
        while context[dropped:] and len(self.engine.tokenize(self.engine.format_chat(head + context[dropped:] + tail))) > room:
            dropped += 2  # a user message and its answer
        if dropped:
            self.on_note(
                f"note: left out the {dropped // 2} oldest turn(s) so the conversation fits the context of "
                f"{self.engine.n_ctx} tokens (raise --ctx to keep more)"
            )
        # If the message alone is too long, the engine says so in one line.
        return head + context[dropped:] + tail

    # --- commands ------------------------------------------------------------------------------

    def handle_command(self, line: str) -> CommandResult:
        """Return the result of an in-chat command line such as ``/strength 2`` (bad values give an error line)."""
        name, _, rest = line.strip().removeprefix("/").partition(" ")
        name, rest = name.lower(), rest.strip()
        try:
            if name in ("help", "h", "?"):
                return CommandResult(list(HELP_LINES))
            if name in ("quit", "exit", "q"):
                return CommandResult(action="quit")
            if name in ("on", "off"):
                return self._switch(name == "on")
            if name == "strength":
                return self._strength(rest)
            if name == "layers":
                return self._layers(rest)
            if name in ("vectors", "steering"):
                return CommandResult(self.describe())
            if name == "compare":
                return CommandResult(action="compare")
            if name == "reset":
                n = len(self.messages) // 2
                self.reset()
                return CommandResult([f"conversation cleared ({n} turn(s) forgotten); settings kept"])
            if name == "save":
                if not rest:
                    raise AlignezError("/save needs a file name, like /save chat.json")
                self.save(Path(rest).expanduser())
                return CommandResult([f"saved {len(self.messages) // 2} turn(s) and the settings to {rest}"])
        except AlignezError as err:
            return CommandResult(error=str(err))
        return CommandResult(error=f"unknown command /{name}; type /help for the list of commands")

    def _switch(self, on: bool) -> CommandResult:
        self.steering.enabled = on
        lines = [f"steering {'on' if on else 'off'}"]
        if on and not self.steering.vectors and not self.steering.profiles:
            lines.append("(nothing to steer with: start the chat with --vector FILE or --profile FILE)")
        return CommandResult(lines)

    def _strength(self, rest: str) -> CommandResult:
        slots = self.steering.slots
        if not slots:
            raise AlignezError("no vector or profile is loaded; start the chat with --vector FILE or --profile FILE")
        if not rest:
            return CommandResult(self.describe())
        args = rest.rsplit(None, 1)
        try:
            value = parse_strength(args[-1])
        except AlignezError as err:
            raise AlignezError(f"{err} (/strength X or /strength NAME X)") from None
        if len(args) == 1:
            targets = slots
        else:
            targets = [s for s in slots if s.name == args[0]]
            if not targets:
                names = ", ".join(s.name for s in slots)
                raise AlignezError(f"nothing loaded is named {args[0]!r}; the names are: {names}")
        for slot in targets:
            slot.strength, slot.origin = value, SET_IN_CHAT
        which = "everything" if len(args) == 1 else targets[0].name
        return CommandResult([f"strength {value:g} for {which}"])

    def _layers(self, rest: str) -> CommandResult:
        if not rest:
            r = self.steering.layer_range
            return CommandResult([f"steering layers {r[0]}-{r[1]}" if r else "steering every layer"])
        self.steering.layer_range = parse_layer_range(rest, self.engine.n_layer)
        r = self.steering.layer_range
        lines = [f"steering layers {r[0]}-{r[1]}" if r else "steering every layer"]
        used = {L for v in self.steering.vectors for L in v.vector.layers} | {
            L for p in self.steering.profiles for L in p.profile.layers
        }
        if r and used and not any(r[0] <= L <= r[1] for L in used):
            lines.append(f"(no loaded vector or profile has a layer in {r[0]}-{r[1]}: steering now changes nothing)")
        return CommandResult(lines)

    def describe(self) -> list[str]:
        """Return lines saying what steers the model now (vectors, profiles, strengths, layers, on/off)."""
        lines = self.steering.describe()
        if not self.steering.vectors and not self.steering.profiles:
            lines.insert(0, "no vector or profile loaded")
        return lines

    def reset(self) -> None:
        """Forget the conversation; steering, sampling and the system prompt stay."""
        self.messages.clear()
        self.last_turn = None

    # --- settings and transcript ---------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Return every setting that shapes an answer, as JSON-ready data."""
        st = self.steering
        vectors = [
            {"name": v.name, "path": _resolved(v.path), "strength": v.strength, "strength_from": v.origin,
             "layers": v.vector.layers}
            for v in st.vectors
        ]
        profiles = [
            {
                "name": p.name, "path": _resolved(p.path), "strength": p.strength, "strength_from": p.origin,
                "layers": p.profile.layers, "method": p.profile.method, "site": p.profile.site,
            }
            for p in st.profiles
        ]
        return {
            "model": {"path": str(self.engine.path.resolve()), "name": self.engine.name, "arch": self.engine.arch,
                      "chat_template": self.engine.is_chat},
            "sampling": {**dataclasses.asdict(self.sampling), "stop": list(self.sampling.stop)},
            "steering": {
                "enabled": st.enabled,
                "active": st.active,
                "layers": f"{st.layer_range[0]}-{st.layer_range[1]}" if st.layer_range else None,
                "top_n": st.top_n,
                "vectors": vectors,
                "profiles": profiles,
            },
            "system": self.system,
        }

    def transcript(self) -> dict[str, Any]:
        """Return the conversation and every setting as one JSON-ready object (what /save writes)."""
        return {
            "format": TRANSCRIPT_FORMAT,
            "version": TRANSCRIPT_VERSION,
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.settings(),
            "messages": [dict(m) for m in self.messages],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Return ``path`` after writing the transcript there atomically."""
        try:
            write_json(path, self.transcript())
        except OSError as err:
            raise AlignezError(f"cannot write {path}: {err.strerror or err}") from None
        return Path(path)


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path is not None else None

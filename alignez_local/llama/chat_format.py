"""Prompt text for a conversation: the GGUF's own chat template (rendered with jinja2 in a
sandbox), or a plain ``User:``/``Assistant:`` format for base models."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence

from alignez_local.errors import AlignezError

# Where a base model's answer in the plain format ends.
PLAIN_STOP = ("\nUser:", "\nQuestion:")


def format_chat(
    messages: Sequence[Mapping[str, str]],
    template: str | None,
    bos_text: str = "",
    eos_text: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Return the prompt text for a conversation: ``template`` (a GGUF chat template) when there is
    one, else the plain format.

    Plain format (base models): an optional system text and a blank line, then one line per turn,
    ``User: ...`` and ``Assistant: ...``, ending with ``Assistant:`` when a reply is wanted;
    generation stops at ``\\nUser:`` (``PLAIN_STOP``).
    """
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise AlignezError("a chat message needs a role (system, user or assistant) and text content")
    if template is None:
        return plain_format(messages, add_generation_prompt)
    return render_template(template, list(messages), bos_text, eos_text, add_generation_prompt)


def plain_format(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Return the plain base-model format of ``messages`` (see ``format_chat``)."""
    parts: list[str] = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n\n")
        else:
            who = "User" if m["role"] == "user" else "Assistant"
            parts.append(f"{who}: {m['content'].strip()}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render_template(
    template: str, messages: list[Mapping[str, str]], bos_text: str, eos_text: str, add_generation_prompt: bool
) -> str:
    """Return ``template`` rendered for ``messages``; a template that refuses the system role gets
    the system text folded into the first user turn."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_text, eos_token=eos_text
        )
    except jinja2.TemplateError as err:
        # Some templates (Gemma's, for one) refuse a system role: fold it into the first user turn.
        if messages and messages[0]["role"] == "system" and len(messages) > 1:
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return render_template(template, merged + list(messages[2:]), bos_text, eos_text, add_generation_prompt)
        raise AlignezError(f"the model's chat template failed: {err}") from None


def chat_parts(
    messages: Sequence[Mapping[str, str]],
    template: str | None,
    bos_text: str = "",
    eos_text: str = "",
    add_generation_prompt: bool = True,
) -> list[tuple[str, bool]] | None:
    """Return ``format_chat``'s prompt cut into ``(text, is_markup)`` parts: the template's own text
    (markup: its control-token text is meant as control tokens) and each message's content (not
    markup: whatever it holds is text). None when the template changes the contents on the way
    in a way this cannot follow.

    The template is rendered once more with a unique placeholder for each content; the cut is
    trusted only when putting the contents back (as they are, or stripped, as ``| trim`` and the
    plain format do) gives exactly the ordinary rendering.
    """
    whole = format_chat(messages, template, bos_text, eos_text, add_generation_prompt)
    nonce = secrets.token_hex(8)
    # Private-use characters around a random number: no template writes them, and a content that
    # happened to hold this exact string would only make the check below fail (None), never mislead.
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    placeholders = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    try:
        skeleton = format_chat(placeholders, template, bos_text, eos_text, add_generation_prompt)
    except AlignezError:
        return None
    pieces = re.split(f"\ue000{nonce}:([0-9]+)\ue001", skeleton)
    for strip in (False, True):
        parts: list[tuple[str, bool]] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                parts.append((piece, True))
            else:
                content = messages[int(piece)]["content"]
                parts.append((content.strip() if strip else content, False))
        if "".join(text for text, _ in parts) == whole:
            return [(text, markup) for text, markup in parts if text]
    return None

"""What kind of GGUF file this is (model, control vector, steering profile), and the one place that
says "this is X, not Y" when a file of the wrong kind is given.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from alignez_local.errors import AlignezError
from alignez_local.formats.gguf_file import GGUFContents, read_gguf

CONTROL_VECTOR_ARCH = "controlvector"
PROFILE_ARCH = "alignez-profile"
DIRECTION_RE = re.compile(r"direction\.([0-9]+)")

GGUFKind = Literal["model", "control-vector", "profile"]


def is_direction_name(name: str) -> bool:
    """Return True when ``name`` is ``direction.N`` with N written as plain decimal digits."""
    return DIRECTION_RE.fullmatch(name) is not None


# How messages name each kind ("X is <found>, not <wanted>"), and what to do with a file of that
# kind given by mistake.
_KIND_TEXT: dict[str, tuple[str, str, str]] = {
    "model": ("a model file", "a model", "pass it with -m"),
    "control-vector": ("a control vector", "a control vector", "pass it with --vector"),
    "profile": ("a steering profile", "a steering profile", "pass it with --profile"),
    "adapter": ("a LoRA adapter", "an adapter", "give another file"),
}
_ANY_OF_OURS = "a model, control vector or steering profile"


def classify(contents: GGUFContents) -> GGUFKind | Literal["adapter"] | None:
    """Return the kind of an already parsed file, or None when it is none of ours.

    Profile: ``general.architecture == "alignez-profile"``. Control vector: architecture
    ``"controlvector"`` or every tensor named ``direction.N``. Adapter: ``general.type ==
    "adapter"`` (a LoRA). Model: a real architecture and ``token_embd``/``blk.`` tensors.
    """
    arch = contents.architecture
    if arch == PROFILE_ARCH:
        return "profile"
    if arch == CONTROL_VECTOR_ARCH:
        return "control-vector"
    if contents.metadata.get("general.type") == "adapter":
        return "adapter"
    names = list(contents.tensors)
    if names and all(is_direction_name(n) for n in names):
        return "control-vector"
    if arch and any(n.startswith(("token_embd", "blk.")) for n in names):
        return "model"
    return None


def require_kind(contents: GGUFContents, expect: GGUFKind | None, *, unknown_ok: bool = False) -> GGUFKind | None:
    """Return the file's kind; raise the one "this is X, not Y" error when it is not ``expect``.

    ``expect`` None accepts any of our three kinds. ``unknown_ok`` lets a file of no known kind
    through (None), for a caller whose own checks then say precisely what is wrong with it.
    """
    kind = classify(contents)
    wanted = _ANY_OF_OURS if expect is None else _KIND_TEXT[expect][1]
    if kind is None:
        if unknown_ok:
            return None
        raise AlignezError(
            f"{contents.path} is a GGUF file but not {wanted} "
            f"(general.architecture = {contents.architecture!r}, {len(contents.tensors)} tensors); check the file"
        )
    if kind == "adapter" or (expect is not None and kind != expect):
        found, _, howto = _KIND_TEXT[kind]
        raise AlignezError(f"{contents.path} is {found}, not {wanted}; {howto}")
    return kind


def gguf_kind(path: str | os.PathLike[str], expect: GGUFKind | None = None) -> GGUFKind:
    """Return "model", "control-vector" or "profile" for a GGUF file, reading only its header.

    Raises AlignezError for any other file, and for a file of another kind than ``expect``.
    """
    wanted = _ANY_OF_OURS if expect is None else _KIND_TEXT[expect][1]
    contents = read_gguf(path, want_data=False, want_arrays=False, what=f"a .gguf {wanted[2:]}")
    kind = require_kind(contents, expect)
    assert kind is not None  # require_kind only returns None with unknown_ok
    return kind

"""The one error type users see: a single line that says what is wrong and what to do."""


class AlignezError(Exception):
    """A problem the user can act on. The CLI prints ``str(err)`` as one line and exits non-zero."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line: the CLI contract is one clear line, no traceback.
        super().__init__(" ".join(message.split()))

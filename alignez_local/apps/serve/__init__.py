"""``alignez serve``: an OpenAI-compatible HTTP server where every request chooses its own steering.

- ``steering``: the loaded vectors/profiles and per-request edits inside a decode batch;
- ``worker``: the thread that owns the Engine; requests join its running decode as slots free up;
- ``schemas`` / ``errors``: request checking and OpenAI's error shape;
- ``app``: the Starlette routes; ``command``: the click command.
"""

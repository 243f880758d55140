"""``alignez serve``: an OpenAI-compatible HTTP server where every request chooses its own steering.

- ``steering``: the loaded vectors/profiles and per-request edits inside one decode batch;
- ``worker``: the thread that owns the Engine and batches waiting requests;
- ``schemas`` / ``errors``: request checking and OpenAI's error shape;
- ``app``: the Starlette routes; ``command``: the click command.
"""

"""The llama.cpp engine: the only code that talks to llama.cpp.

- ``engine.py``: the ``Engine`` facade (load, generate, capture, steer);
- ``scheduler.py``: parallel sequences in shared batches, sampling, stop strings, streaming;
- ``hooks.py``: the eval callback and its capture/edit state;
- ``bindings.py``: ggml access, tensor struct offsets, log sink, backend start-up;
- ``sampling.py``, ``vocab.py``, ``chat_format.py``, ``cvec.py``: value types, tokens, prompt
  text, and the control-vector buffer.
"""

from alignez_local.llama.cvec import cvec_buffer
from alignez_local.llama.engine import Completion, Engine, Sampling, TokenFn

__all__ = ["Completion", "Engine", "Sampling", "TokenFn", "cvec_buffer"]

"""The control-vector buffer llama.cpp's ``llama_set_adapter_cvec`` takes, built in one place.

Model-free numpy, so the formats layer (``ControlVector``) and the engine share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from alignez_local.errors import AlignezError


def check_vectors(vectors: Mapping[int, ArrayLike], n_layer: int, n_embd: int) -> dict[int, np.ndarray]:
    """Return ``vectors`` as flat float32 arrays after checking their layers and width fit a model
    of ``n_layer`` layers and width ``n_embd`` (layer 0 takes no control vector in llama.cpp)."""
    out: dict[int, np.ndarray] = {}
    for layer, v in vectors.items():
        if not 1 <= int(layer) < n_layer:
            raise AlignezError(f"a control vector for layer {layer} does not fit: this model takes layers 1..{n_layer - 1}")
        a = np.asarray(v, dtype=np.float32).reshape(-1)
        if a.size != n_embd:
            raise AlignezError(f"a control vector of width {a.size} does not fit this model (n_embd {n_embd})")
        if not np.all(np.isfinite(a)):
            raise AlignezError(f"the control vector for layer {layer} has NaN or infinite values")
        out[int(layer)] = a
    return out


def cvec_buffer(
    vectors: Mapping[int, ArrayLike] | Iterable[Mapping[int, ArrayLike]], n_layer: int, n_embd: int
) -> np.ndarray:
    """Return the flat float32 buffer of ``n_embd * (n_layer - 1)`` floats for ``llama_set_adapter_cvec``.

    ``vectors`` maps layer -> direction, or is several such mappings, which are summed (as
    llama.cpp sums several control-vector files). Slot ``i`` holds layer ``i + 1``: layer 0 has no
    slot. The buffer always covers every layer, because llama.cpp keeps OLD values for layers a
    shorter buffer leaves out.
    """
    groups = [vectors] if isinstance(vectors, Mapping) else list(vectors)
    buf = np.zeros((max(n_layer, 1) - 1) * n_embd, dtype=np.float32)
    for group in groups:
        for layer, v in check_vectors(group, n_layer, n_embd).items():
            buf[(layer - 1) * n_embd : layer * n_embd] += v
    return buf

"""Hugging Face transformers beside llama.cpp (issue 30, docs/engines.md): one GGUF model loaded in
both, another tool's vector file applied the way that tool applies it, and the residual stream after
every block read on both sides. Used by scripts/engine_check.py and tests/test_engines.py.

torch and transformers are imported inside the functions: neither is a dependency of the package.
The files are read here as each tool reads them (its own keys, its own hook point), not through
formats/engines.py, so that a wrong conversion there shows up as a mismatch here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.errors import AlignezError

# tool -> (how its file is read, where its key K is added). "input": the input of block K (IBM's
# LeashLayer); "output": the output of block K. "ibm-as-output" is a deliberate mistake (IBM's file
# read with llama.cpp's convention, one block late): the check must tell it apart.
HOOKS = {"repeng": ("gguf", "output"), "easysteer": ("gguf", "output"), "steering-vectors": ("safetensors", "output"),
         "ibm": ("svec", "input"), "ibm-as-output": ("svec", "output")}


def _torch() -> Any:
    try:
        import torch  # noqa: PLC0415 - optional, see the module docstring
    except ImportError:
        raise AlignezError("the transformers check needs torch: pip install 'alignez-local[hf]'") from None
    return torch


def load_hf(model_path: str | Path, threads: int = 1) -> Any:
    """Return the GGUF model at ``model_path`` in transformers (dequantized to float32, eval mode)."""
    torch = _torch()
    try:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415
    except ImportError:
        raise AlignezError("the transformers check needs transformers and accelerate: pip install transformers accelerate") from None

    torch.set_num_threads(threads)
    p = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval()


def tool_vectors(tool: str, path: str | Path) -> dict[int, np.ndarray]:
    """Return key -> vector from ``tool``'s file, read as that tool reads it."""
    kind = HOOKS[tool][0]
    if kind == "gguf":  # repeng's and EasySteer's import_gguf: every direction.K tensor, K as written
        import gguf  # noqa: PLC0415

        reader = gguf.GGUFReader(path)
        return {int(t.name.split(".")[1]): np.array(t.data, dtype=np.float32) for t in reader.tensors
                if t.name.startswith("direction.")}
    if kind == "svec":  # activation_steering.SteeringVector.load
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {int(k): np.asarray(v, dtype=np.float32) for k, v in data["directions"].items()}
    import safetensors.numpy  # noqa: PLC0415 - steering-vectors: the user's own load_file

    return {int(k): v.astype(np.float32) for k, v in safetensors.numpy.load_file(str(path)).items()}


def _blocks(model: Any) -> Any:
    return model.model.layers


@contextmanager
def steered(model: Any, tool: str, path: str | Path, scale: float = 1.0) -> Iterator[None]:
    """Inside this block ``model`` adds ``scale x`` the file's vectors where ``tool`` adds them."""
    torch = _torch()
    where = HOOKS[tool][1]
    handles = []
    blocks = _blocks(model)
    for key, vec in tool_vectors(tool, path).items():
        add = torch.from_numpy(vec) * scale
        if where == "output":
            def hook(_m: Any, _args: Any, out: Any, add: Any = add) -> Any:
                if isinstance(out, tuple):  # older transformers: (hidden, ...)
                    return (out[0] + add,) + out[1:]
                return out + add
            handles.append(blocks[key].register_forward_hook(hook))
        else:
            def pre(_m: Any, args: Any, add: Any = add) -> Any:
                return (args[0] + add,) + tuple(args[1:])
            handles.append(blocks[key].register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def streams(model: Any, token_ids: Sequence[int]) -> np.ndarray:
    """Return (n_layer, 2, n_embd): the residual stream leaving each block (llama.cpp's ``l_out``),
    its last token's row and its mean over the tokens, read as the next block (or the final norm)
    receives it: after any tool's hook on either side of the boundary. Register steering first."""
    torch = _torch()
    blocks = _blocks(model)
    n = len(blocks)
    out = np.zeros((n, 2, model.config.hidden_size), dtype=np.float32)
    handles = []

    def reader(i: int) -> Any:
        def pre(_m: Any, args: Any) -> None:
            x = args[0][0].detach().float()
            out[i, 0], out[i, 1] = x[-1].numpy(), x.mean(0).numpy()
        return pre
    for i in range(n):
        nxt = blocks[i + 1] if i + 1 < n else model.model.norm
        # Registered after the steering hooks, so it runs after a tool's pre-hook on the same block.
        handles.append(nxt.register_forward_pre_hook(reader(i)))
    try:
        with torch.no_grad():
            model(torch.tensor([list(token_ids)]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def greedy(model: Any, token_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int],
           repetition_penalty: float = 1.0) -> list[int]:
    """Return the greedy continuation's tokens (without the stop token)."""
    torch = _torch()
    with torch.no_grad():
        out = model.generate(torch.tensor([list(token_ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                             repetition_penalty=repetition_penalty, eos_token_id=list(stop_ids),
                             pad_token_id=stop_ids[0], attention_mask=torch.ones(1, len(token_ids), dtype=torch.long))
    new = [int(t) for t in out[0, len(token_ids):]]
    return new[:-1] if new and new[-1] in stop_ids else new

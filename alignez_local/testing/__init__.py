"""Test support shared by the test suite and the benchmark scripts (so neither imports the other):
a tiny random-weight llama GGUF, a free port, and the judge's fixed (question, answer) pairs.

The tiny model is a real model llama.cpp runs in milliseconds, for where behaviour does not matter
but the mechanics do (tensor capture, steering, batching). It has a ChatML template, so the chat
paths run on it too. Not part of the API a user steers with.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

from alignez_local.evaluation.judge_check import load_examples

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# SentencePiece token types, as llama.cpp reads them.
_NORMAL, _CONTROL, _BYTE = 1, 3, 6


def write_tiny_llama(
    path: str | Path,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    n_ctx: int = 1024,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Write a random-weight llama model to ``path`` and return the path."""
    import gguf  # imported here: only tests and scripts need to write models

    rng = np.random.default_rng(seed)
    pieces: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, _CONTROL, _CONTROL, _CONTROL, _CONTROL]  # 2 = UNKNOWN
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    words = list("abcdefghijklmnopqrstuvwxyz") + ["the", "and", "you", "is", "of", "to", "in"]
    for w in words:
        pieces += [w, "\u2581" + w]
        types += [_NORMAL, _NORMAL]
    pieces.append("\u2581")
    types.append(_NORMAL)
    n_vocab = len(pieces)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("alignez-tiny-random")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 5 + [0.0] * 256 + [-float(i) for i in range(n_vocab - 261)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", (1.0 + rand(n_embd, scale=0.1)).astype(np.float32))
    w.add_tensor("output.weight", rand(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1.0 + rand(n_embd, scale=0.1)).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1.0 + rand(n_embd, scale=0.1)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def free_port() -> int:
    """Return a port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judge_pairs(n: int = 32) -> list[tuple[str, str]]:
    """Return ``n`` distinct (question, answer) pairs: the hand-made judge examples, then questions
    given another question's answer (off-topic answers); fewer when the examples run out."""
    ex = load_examples()
    pairs = list(dict.fromkeys((e["question"], e["answer"]) for e in ex))
    for i, e in enumerate(ex):
        other = ex[(i + len(ex) // 2) % len(ex)]
        if other["question"] != e["question"] and len(pairs) < n:
            pairs = list(dict.fromkeys([*pairs, (e["question"], other["answer"])]))
    return pairs[:n]

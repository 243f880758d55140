"""File formats: GGUF reading, control vectors (ours, cvector-generator's, repeng's) and profiles."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from alignez_local.formats import gguf_file
from alignez_local.formats.control_vector import (
    META_N_LAYER,
    ControlVector,
    read_control_vector,
    write_control_vector,
)
from alignez_local.errors import AlignezError
from alignez_local.formats.gguf_file import GGUFArraySummary, ValueType, read_gguf
from alignez_local.formats.kinds import gguf_kind
from alignez_local.formats.profile import (
    KEY_META,
    KEY_VERSION,
    PROFILE_FORMAT_VERSION,
    SteeringProfile,
    load_profile,
    save_profile,
)

N_EMBD = 16


@pytest.fixture(autouse=True)
def _strict_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    # Let parser bugs surface as themselves instead of the user-facing catch-all line.
    monkeypatch.setattr(gguf_file, "_RAISE_INTERNAL_ERRORS", True)


def rng_vec(seed: int, n: int = N_EMBD) -> np.ndarray:
    """Return a deterministic float32 unit vector."""
    v = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return v / np.linalg.norm(v)


def make_cv(layers: tuple[int, ...] = (1, 2, 5), **kw: Any) -> ControlVector:
    """Return a small control vector with one seeded direction per layer."""
    return ControlVector({L: rng_vec(L) for L in layers}, **kw)


def gguf_writer_file(path: Path, arch: str, kvs: list[tuple[str, str, Any]], tensors: list[tuple[str, np.ndarray]]) -> Path:
    """Return ``path`` after writing a GGUF file with gguf.GGUFWriter (an independent writer)."""
    w = GGUFWriter(path, arch)
    for key, kind, value in kvs:
        getattr(w, f"add_{kind}")(key, value)
    for name, arr in tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _pack_value(vtype: int, value: Any) -> bytes:
    """Return the little-endian encoding of one GGUF value (no type prefix)."""
    fmts = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
    if vtype in fmts:
        return struct.pack(fmts[vtype], value)
    if vtype == 8:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    if vtype == 9:
        item_type, items = value
        out = struct.pack("<IQ", item_type, len(items))
        for item in items:
            if item_type == 9:
                out += _pack_value(9, item)
            else:
                out += _pack_value(item_type, item)
        return out
    if isinstance(value, bytes):
        return value  # raw bytes for a deliberately unknown type code
    raise ValueError(vtype)


def raw_gguf(
    kvs: list[tuple[str, int, Any]],
    tensors: list[tuple[str, tuple[int, ...], int, bytes]],
    *,
    version: int = 3,
    alignment: int = 32,
    offsets: list[int] | None = None,
) -> bytes:
    """Return GGUF bytes built by hand, for layouts GGUFWriter refuses to produce.

    Tensors are (name, ne fastest-first, ggml type, data bytes); data is packed with padding.
    """
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += _pack_value(8, key) + struct.pack("<I", vtype) + _pack_value(vtype, value)
    running = 0
    for i, (name, ne, ttype, data) in enumerate(tensors):
        off = offsets[i] if offsets is not None else running
        out += _pack_value(8, name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ttype, off)
        running += len(data) + (-len(data) % alignment)
    out += b"\0" * (-len(out) % alignment)
    for _, _, _, data in tensors:
        out += data + b"\0" * (-len(data) % alignment)
    return out


def cv_tensor(name: str, vec: np.ndarray) -> tuple[str, tuple[int, ...], int, bytes]:
    """Return a raw F32 1-D tensor entry."""
    return (name, (vec.size,), 0, vec.astype("<f4").tobytes())


def fake_model(path: Path, arch: str = "llama") -> Path:
    """Return ``path`` after writing a tiny model-like GGUF (token_embd + one block)."""
    return gguf_writer_file(
        path,
        arch,
        [(f"{arch}.block_count", "uint32", 2), (f"{arch}.embedding_length", "uint32", N_EMBD),
         ("tokenizer.ggml.tokens", "array", ["a", "b", "c"])],
        [("token_embd.weight", np.zeros((3, N_EMBD), np.float32)),
         ("blk.0.attn_norm.weight", np.ones(N_EMBD, np.float32))],
    )


# --- control vector round trips -----------------------------------------------------------------


def test_round_trip_with_our_reader_and_gguf_reader(tmp_path: Path) -> None:
    meta = {META_N_LAYER: 30, "alignez.method": "mean", "alignez.strength_hint": 2.5}
    cv = make_cv((1, 7, 29), model_hint="llama", metadata=meta, name="helpful")
    path = write_control_vector(tmp_path / "helpful.gguf", cv)
    assert [p.name for p in tmp_path.iterdir()] == ["helpful.gguf"]  # no temp file left behind

    back = read_control_vector(path)
    assert back.layers == [1, 7, 29]
    assert back.model_hint == "llama"
    assert dict(back.metadata) == meta
    assert back.name == "helpful"
    assert back == cv
    for L in cv.layers:
        assert back.directions[L].dtype == np.float32
        np.testing.assert_array_equal(back.directions[L], cv.directions[L])

    # The gguf package's own reader must see exactly llama.cpp's layout.
    r = GGUFReader(path)
    assert [t.name for t in r.tensors] == ["direction.1", "direction.7", "direction.29"]
    for t in r.tensors:
        assert t.tensor_type == GGMLQuantizationType.F32
        assert list(t.shape) == [N_EMBD]
        np.testing.assert_array_equal(np.asarray(t.data), cv.directions[int(t.name.split(".")[1])])
    f = r.fields
    assert f["general.architecture"].contents() == "controlvector"
    assert f["controlvector.model_hint"].contents() == "llama"
    assert f["controlvector.layer_count"].types == [GGUFValueType.UINT32]
    assert f["controlvector.layer_count"].contents() == 30  # the model's n_layer, from metadata
    assert f["alignez.method"].contents() == "mean"
    assert f["alignez.model.n_layer"].contents() == 30
    assert f["alignez.strength_hint"].contents() == pytest.approx(2.5)
    assert gguf_kind(path) == "control-vector"


def test_layer_count_defaults_to_highest_layer_plus_one(tmp_path: Path) -> None:
    path = write_control_vector(tmp_path / "v.gguf", make_cv((2, 9)))
    assert GGUFReader(path).fields["controlvector.layer_count"].contents() == 10
    assert "controlvector.model_hint" not in GGUFReader(path).fields  # no hint known, none written


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    write_control_vector(path, make_cv((1,)))
    write_control_vector(path, make_cv((3,)))
    assert read_control_vector(path).layers == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf"]
    with pytest.raises(AlignezError, match="does not exist"):
        write_control_vector(tmp_path / "missing" / "v.gguf", make_cv())


def test_reads_cvector_generator_layout(tmp_path: Path) -> None:
    # llama.cpp's cvector-generator: direction.1 .. direction.(n_layer-1), int32 layer_count.
    n_layer = 6
    path = gguf_writer_file(
        tmp_path / "cvgen.gguf",
        "controlvector",
        [("controlvector.model_hint", "string", "llama"), ("controlvector.layer_count", "int32", n_layer - 1)],
        [(f"direction.{i}", rng_vec(i)) for i in range(1, n_layer)],
    )
    cv = read_control_vector(path)
    assert cv.layers == [1, 2, 3, 4, 5]
    assert cv.model_hint == "llama"
    assert cv.n_embd == N_EMBD
    assert dict(cv.metadata) == {}
    np.testing.assert_array_equal(cv.directions[4], rng_vec(4))
    assert cv.check_compatible(n_layer, N_EMBD, "llama") == []


def test_reads_repeng_export_gguf_layout(tmp_path: Path) -> None:
    # As repeng's ControlVector.export_gguf writes it.
    directions = {3: rng_vec(30), 4: rng_vec(40), 5: rng_vec(50)}
    w = GGUFWriter(tmp_path / "repeng.gguf", "controlvector")
    w.add_string("controlvector.model_hint", "gemma3")
    w.add_uint32("controlvector.layer_count", len(directions))
    for layer, vec in directions.items():
        w.add_tensor(f"direction.{layer}", vec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cv = read_control_vector(tmp_path / "repeng.gguf")
    assert cv.layers == [3, 4, 5]
    assert cv.model_hint == "gemma3"
    for layer, vec in directions.items():
        np.testing.assert_array_equal(cv.directions[layer], vec)
    assert cv.check_compatible(18, N_EMBD, "llama") == ["vector repeng was made for 'gemma3', model is 'llama'"]


def test_ignores_foreign_metadata_and_accepts_other_arch_with_direction_tensors(tmp_path: Path) -> None:
    path = gguf_writer_file(
        tmp_path / "odd.gguf", "llama",
        [("general.name", "string", "x"), ("alignez.note", "string", "kept"),
         ("alignez.flag", "bool", True), ("alignez.list", "array", [1, 2])],
        [("direction.2", rng_vec(2))],
    )
    cv = read_control_vector(path)
    assert cv.layers == [2]
    assert dict(cv.metadata) == {"alignez.note": "kept"}  # bools and arrays are not our metadata
    assert gguf_kind(path) == "control-vector"


# --- arithmetic, compatibility -------------------------------------------------------------------


def test_check_compatible_refuses_layers_the_model_lacks() -> None:
    with pytest.raises(AlignezError, match=r"has direction\.5 but the model has 5 layers \(1\.\.4 usable\)"):
        make_cv((1, 5), name="v").check_compatible(5, N_EMBD, "llama")
    with pytest.raises(AlignezError, match="layer 0"):
        make_cv((0, 1)).check_compatible(5, N_EMBD, "llama")


def test_arithmetic() -> None:
    a = ControlVector({1: np.ones(4), 2: np.full(4, 2.0)}, "llama", {"alignez.k": 1, "alignez.x": "a"}, "a")
    b = ControlVector({2: np.ones(4), 3: np.full(4, 3.0)}, None, {"alignez.k": 1, "alignez.x": "b"}, "b")
    s = a + b
    assert s.layers == [1, 2, 3]
    np.testing.assert_array_equal(s.directions[2], np.full(4, 3.0))
    np.testing.assert_array_equal(s.directions[3], np.full(4, 3.0))
    assert s.model_hint == "llama"
    assert dict(s.metadata) == {"alignez.k": 1}  # only keys both agree on
    d = a - b
    np.testing.assert_array_equal(d.directions[2], np.ones(4))
    np.testing.assert_array_equal(d.directions[3], np.full(4, -3.0))
    for scaled in (a * 2, 2 * a, a * np.float64(2), np.float32(2) * a, a / 0.5):
        assert isinstance(scaled, ControlVector)
        np.testing.assert_array_equal(scaled.directions[2], np.full(4, 4.0))
    np.testing.assert_array_equal((-a).directions[1], -np.ones(4))
    assert (a * 2).directions[1].dtype == np.float32

    with pytest.raises(AlignezError, match="by zero"):
        a / 0
    with pytest.raises(AlignezError, match="finite"):
        a * float("inf")
    with pytest.raises(AlignezError, match="NaN or infinite"):
        ControlVector({1: np.full(4, 3e38)}) * 10
    with pytest.raises(AlignezError, match="width 4.*width 5"):
        a + ControlVector({1: np.ones(5)}, name="c")
    with pytest.raises(TypeError):
        a + 1  # type: ignore[operator]


def test_control_vector_is_immutable() -> None:
    cv = make_cv((1,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cv.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cv.directions[2] = np.zeros(N_EMBD)  # type: ignore[index]
    with pytest.raises(ValueError):
        cv.directions[1][0] = 5.0
    src = np.ones(4, np.float32)
    copy = ControlVector({1: src})
    src[0] = 9.0
    assert copy.directions[1][0] == 1.0


def test_control_vector_validates_construction() -> None:
    with pytest.raises(AlignezError, match="no directions"):
        ControlVector({})
    with pytest.raises(AlignezError, match="same width"):
        ControlVector({1: np.ones(4), 2: np.ones(5)})
    with pytest.raises(AlignezError, match="NaN"):
        ControlVector({1: np.array([1.0, np.nan])})
    with pytest.raises(AlignezError, match="1-D"):
        ControlVector({1: np.ones((2, 2))})
    with pytest.raises(AlignezError, match="must start with"):
        ControlVector({1: np.ones(2)}, metadata={"general.name": "x"})


def test_check_compatible_messages() -> None:
    cv = make_cv((1, 29), model_hint="gemma3", name="X")
    with pytest.raises(AlignezError) as e:
        cv.check_compatible(30, 640, "llama")
    assert str(e.value) == f"vector X has width {N_EMBD} but model has n_embd 640; it was made for another model"
    with pytest.raises(AlignezError) as e:
        make_cv((1, 31), name="X").check_compatible(30, N_EMBD, "llama")
    assert str(e.value) == "vector X has direction.31 but the model has 30 layers (1..29 usable)"
    assert cv.check_compatible(30, N_EMBD, "llama") == ["vector X was made for 'gemma3', model is 'llama'"]
    assert cv.check_compatible(30, N_EMBD, "gemma3") == []
    other = make_cv((1,), metadata={META_N_LAYER: 32}, name="Y")
    assert other.check_compatible(30, N_EMBD, "llama") == ["vector Y was made for a model with 32 layers; this one has 30"]


# --- control vector refusals --------------------------------------------------------------------


def _refused(path: Path) -> str:
    """Return the one-line message read_control_vector raises for ``path``."""
    with pytest.raises(AlignezError) as e:
        read_control_vector(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_refuses_direction_zero(tmp_path: Path) -> None:
    path = gguf_writer_file(tmp_path / "z.gguf", "controlvector", [], [("direction.0", rng_vec(0)), ("direction.1", rng_vec(1))])
    assert "direction.0" in _refused(path) and "layers start at 1" in _refused(path)
    with pytest.raises(AlignezError, match="direction.0"):
        write_control_vector(tmp_path / "w.gguf", make_cv((0, 1)))
    assert not (tmp_path / "w.gguf").exists()


def test_refuses_nan_and_inf(tmp_path: Path) -> None:
    for bad in (np.nan, np.inf, -np.inf):
        vec = rng_vec(1)
        vec[3] = bad
        path = gguf_writer_file(tmp_path / "n.gguf", "controlvector", [], [("direction.1", vec)])
        assert "NaN or infinite" in _refused(path)


def test_refuses_f16_tensor(tmp_path: Path) -> None:
    path = gguf_writer_file(tmp_path / "h.gguf", "controlvector", [], [("direction.1", rng_vec(1).astype(np.float16))])
    assert "is F16; llama.cpp only loads F32" in _refused(path)


def test_refuses_2d_tensor(tmp_path: Path) -> None:
    path = gguf_writer_file(tmp_path / "m.gguf", "controlvector", [], [("direction.1", np.ones((2, 8), np.float32))])
    assert "has shape (2, 8); control vector tensors must be 1-D" in _refused(path)


def test_refuses_mixed_lengths(tmp_path: Path) -> None:
    path = gguf_writer_file(
        tmp_path / "x.gguf", "controlvector", [], [("direction.1", rng_vec(1, 16)), ("direction.2", rng_vec(2, 8))]
    )
    assert "direction.2 has 8 values but direction.1 has 16" in _refused(path)


def test_refuses_extra_tensor_name(tmp_path: Path) -> None:
    path = gguf_writer_file(
        tmp_path / "e.gguf", "controlvector", [], [("direction.1", rng_vec(1)), ("bias.1", rng_vec(2))]
    )
    assert "tensor named 'bias.1'" in _refused(path)
    for name in ("direction.01", "direction.1x", "direction.-1", "direction."):
        path = gguf_writer_file(tmp_path / "n.gguf", "controlvector", [], [(name, rng_vec(1))])
        _refused(path)


def test_refuses_no_tensors_and_huge_layer(tmp_path: Path) -> None:
    path = gguf_writer_file(tmp_path / "empty.gguf", "controlvector", [("controlvector.layer_count", "uint32", 0)], [])
    assert "no direction tensors" in _refused(path)
    path = gguf_writer_file(tmp_path / "big.gguf", "controlvector", [], [("direction.5000", rng_vec(1))])
    assert "above 4096" in _refused(path)


def test_refuses_model_and_profile_with_a_pointer(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "tiny-model.gguf")
    assert _refused(model) == f"{model} is a model file, not a control vector; pass it with -m"
    prof = save_profile(tmp_path / "p.gguf", make_profile())
    assert _refused(prof) == f"{prof} is a steering profile, not a control vector; pass it with --profile"
    lora = gguf_writer_file(
        tmp_path / "l.gguf", "llama", [("general.type", "string", "adapter")],
        [("blk.0.attn_q.weight.lora_a", np.ones(4, np.float32))],
    )
    assert _refused(lora) == f"{lora} is a LoRA adapter, not a control vector; give another file"


# --- generic GGUF reader ------------------------------------------------------------------------


def test_gguf_kind(tmp_path: Path) -> None:
    assert gguf_kind(fake_model(tmp_path / "m.gguf")) == "model"
    assert gguf_kind(write_control_vector(tmp_path / "c.gguf", make_cv())) == "control-vector"
    assert gguf_kind(save_profile(tmp_path / "p.gguf", make_profile())) == "profile"
    other = gguf_writer_file(tmp_path / "o.gguf", "whisper", [], [("encoder.conv1.weight", np.ones(4, np.float32))])
    with pytest.raises(AlignezError, match="not a model, control vector or steering profile"):
        gguf_kind(other)
    lora = gguf_writer_file(
        tmp_path / "l.gguf", "llama", [("general.type", "string", "adapter")],
        [("blk.0.attn_q.weight.lora_a", np.ones(4, np.float32))],
    )
    with pytest.raises(AlignezError, match="LoRA adapter"):
        gguf_kind(lora)
    # One place says what a file is when it is not the kind asked for.
    with pytest.raises(AlignezError, match=r"is a control vector, not a model; pass it with --vector"):
        gguf_kind(tmp_path / "c.gguf", expect="model")
    with pytest.raises(AlignezError, match=r"is a steering profile, not a model; pass it with --profile"):
        gguf_kind(tmp_path / "p.gguf", expect="model")
    with pytest.raises(AlignezError, match=r"is a GGUF file but not a steering profile"):
        gguf_kind(other, expect="profile")
    with pytest.raises(AlignezError, match=r"LoRA adapter, not a steering profile"):
        load_profile(lora)


def test_read_gguf_metadata_and_shapes(tmp_path: Path) -> None:
    path = fake_model(tmp_path / "m.gguf")
    c = read_gguf(path)
    assert c.version == 3
    assert c.metadata["general.architecture"] == "llama"
    assert c.metadata["llama.block_count"] == 2 and str(c.value_types["llama.block_count"]) == "UINT32"
    assert c.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert c.value_types["tokenizer.ggml.tokens"] == ValueType(GGUFValueType.ARRAY, GGUFValueType.STRING)
    assert str(c.value_types["tokenizer.ggml.tokens"]) == "ARRAY[STRING]"
    emb = c.tensors["token_embd.weight"]
    assert emb.shape == (3, N_EMBD) and emb.type_name == "F32" and emb.data is not None
    assert emb.data.shape == (3, N_EMBD)
    light = read_gguf(path, want_data=False, want_arrays=False)
    assert light.tensors["token_embd.weight"].data is None
    assert light.metadata["tokenizer.ggml.tokens"] == GGUFArraySummary(GGUFValueType.STRING, 3)


def test_read_gguf_all_value_types_and_custom_alignment(tmp_path: Path) -> None:
    kvs: list[tuple[str, int, Any]] = [
        ("general.architecture", 8, "controlvector"), ("general.alignment", 4, 64),
        ("u8", 0, 200), ("i8", 1, -5), ("u16", 2, 60000), ("i16", 3, -300), ("u32", 4, 4_000_000_000),
        ("i32", 5, -7), ("f32", 6, 1.5), ("b", 7, 1), ("u64", 10, 2**64 - 1), ("i64", 11, -(2**63)),
        ("f64", 12, 0.25), ("arr", 9, (5, [1, -2, 3])), ("sarr", 9, (8, ["x", "yz"])),
    ]
    data = raw_gguf(kvs, [cv_tensor("direction.1", rng_vec(1)), cv_tensor("direction.2", rng_vec(2))], alignment=64)
    path = tmp_path / "all.gguf"
    path.write_bytes(data)
    c = read_gguf(path)
    assert c.alignment == 64 and c.data_offset % 64 == 0
    m = c.metadata
    assert (m["u8"], m["i8"], m["u16"], m["i16"], m["u32"], m["i32"]) == (200, -5, 60000, -300, 4_000_000_000, -7)
    assert m["f32"] == 1.5 and m["b"] is True and m["u64"] == 2**64 - 1 and m["i64"] == -(2**63) and m["f64"] == 0.25
    assert m["arr"].tolist() == [1, -2, 3] and m["sarr"] == ["x", "yz"]
    assert read_control_vector(path).layers == [1, 2]
    # The gguf package agrees on where the data lives.
    r = GGUFReader(path)
    np.testing.assert_array_equal(np.asarray(r.tensors[1].data), rng_vec(2))


def _err(path: Path, fn: Any = read_gguf) -> str:
    with pytest.raises(AlignezError) as e:
        fn(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    assert _err(missing) == f"no such file: {missing}"
    assert _err(missing, read_control_vector) == f"no such file: {missing}"
    assert "is a folder" in _err(tmp_path)
    text = tmp_path / "notes.gguf"
    text.write_text("hello world, this is not gguf")
    assert _err(text, read_control_vector) == f"{text} is not a GGUF file (bad magic); expected a .gguf control vector"
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert _err(empty) == f"{empty} is truncated (0 bytes, header needs 24); download it again"
    good = write_control_vector(tmp_path / "good.gguf", make_cv()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:20])
    assert _err(cut) == f"{cut} is truncated (20 bytes, header needs 24); download it again"
    cut.write_bytes(good[:-10])
    assert _err(cut, read_control_vector).startswith(f"{cut} is truncated ({len(good) - 10} bytes, tensor data needs")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert "not a regular file" in _err(fifo, read_control_vector)


def test_header_level_refusals(tmp_path: Path) -> None:
    path = tmp_path / "h.gguf"
    t = [cv_tensor("direction.1", rng_vec(1))]
    cases: list[tuple[bytes, str]] = [
        (raw_gguf([], t, version=1), "version 1"),
        (raw_gguf([], t, version=7), "GGUF version 7"),
        (b"GGUF" + struct.pack(">IQQ", 3, 1, 0) + b"\0" * 64, "big-endian"),
        (raw_gguf([("a", 8, "x"), ("a", 8, "y")], t), "appears twice"),
        (raw_gguf([], t + t), "tensor 'direction.1' appears twice"),
        (raw_gguf([("n", 9, (9, [(4, [1])]))], t), "nested metadata array"),
        (raw_gguf([("general.alignment", 4, 24)], t), "not a power of two"),
        (raw_gguf([("general.alignment", 10, 32)], t), "not a power of two"),
        (raw_gguf([("k", 13, b"\0" * 8)], t), "unknown value type 13"),
        (raw_gguf([], [("direction.1", (16,), 4, b"\0" * 64)]), "unknown type 4"),
        (raw_gguf([], [("direction.1", (16,), 0, b"\0" * 64)], offsets=[32]), "data offset 32, expected 0"),
        (raw_gguf([], [("direction.1", (1, 1, 1, 1, 1), 0, b"\0" * 4)]), "5 dimensions"),
        (raw_gguf([], [("d" * 64, (4,), 0, b"\0" * 16)]), "longer than 63 bytes"),
        (raw_gguf([], [("direction.1", (2**40, 2**40), 0, b"")]), "has shape"),
        (raw_gguf([], [("direction.1", (7,), 12, b"\0" * 144)]), "block size 256"),
        (b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "claims 4611686018427387904 tensors"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 10**6 + 1), "metadata keys"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1000), "header needs"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60) + b"\0" * 16, "claims 1152921504606846976 bytes"),
        (raw_gguf([("a", 9, (4, [1] * 3))], t)[:60], "truncated"),
    ]
    for data, expected in cases:
        path.write_bytes(data)
        msg = _err(path, read_control_vector)
        assert expected in msg, (expected, msg)


def test_header_checked_before_allocating(tmp_path: Path) -> None:
    # An array claiming 2^24 uint64 items in a tiny file must fail on the size check, not allocate.
    path = tmp_path / "a.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _pack_value(8, "k") + struct.pack("<IIQ", 9, 10, 2**24))
    assert "truncated" in _err(path)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _pack_value(8, "k") + struct.pack("<IIQ", 9, 8, 2**40))
    assert "claims 1099511627776 items" in _err(path)


def test_internal_errors_become_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_file, "_RAISE_INTERNAL_ERRORS", False)

    def boom(*a: Any, **k: Any) -> Any:
        raise IndexError("x")

    monkeypatch.setattr(gguf_file, "_parse", boom)
    path = write_control_vector(tmp_path / "v.gguf", make_cv())
    assert "could not be parsed as GGUF (IndexError)" in _err(path)


# --- profiles -----------------------------------------------------------------------------------


def orthonormal(k: int, seed: int, n: int = N_EMBD) -> np.ndarray:
    """Return a (k, n) float32 matrix with orthonormal rows."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, k)))
    return q.T.astype(np.float32)


def make_profile(**over: Any) -> SteeringProfile:
    """Return a small valid profile; keyword arguments replace fields."""
    fields: dict[str, Any] = dict(
        subspaces={3: orthonormal(2, 3), 7: orthonormal(1, 7)},
        site="ffn_out",
        method="svd-contrast",
        axis={"name": "helpfulness", "positive": "helpful assistant", "negative": "unhelpful assistant"},
        layer_stats={3: {"heldout_accuracy": 0.9, "train_accuracy": 1.0, "explained": 0.8, "k": 2, "n_pairs": 64},
                     7: {"heldout_accuracy": None, "k": 1}},
        params={"variance_cut": 0.9, "max_cos": 0.5, "top_n": 5, "alpha": np.float64(1.0), "layers": [3, 7]},
        provenance={"model_sha256": "ab" * 32, "model_name": "tiny", "arch": "llama", "n_layer": 10,
                    "n_embd": N_EMBD, "data_sha256": "cd" * 32, "package_version": "0.1.0",
                    "created": "2026-11-27T10:00:00Z"},
        name="helpful",
    )
    fields.update(over)
    return SteeringProfile(**fields)


def test_profile_round_trip(tmp_path: Path) -> None:
    prof = make_profile()
    assert prof.n_embd == N_EMBD and prof.layers == [3, 7]
    path = save_profile(tmp_path / "helpful.profile.gguf", prof)
    back = load_profile(path)
    assert back == prof
    assert back.subspaces[3].shape == (2, N_EMBD) and back.subspaces[3].dtype == np.float32
    assert back.layer_stats[7]["heldout_accuracy"] is None
    assert back.params["alpha"] == 1.0 and back.provenance["n_layer"] == 10

    r = GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "alignez-profile"
    assert r.fields[KEY_VERSION].types == [GGUFValueType.UINT32]
    assert r.fields[KEY_VERSION].contents() == PROFILE_FORMAT_VERSION
    meta = json.loads(r.fields[KEY_META].contents())
    assert meta["site"] == "ffn_out" and meta["layer_stats"]["3"]["k"] == 2
    by_name = {t.name: t for t in r.tensors}
    assert set(by_name) == {"subspace.3", "subspace.7"}
    t = by_name["subspace.3"]
    assert t.tensor_type == GGMLQuantizationType.F32
    assert list(t.shape) == [N_EMBD, 2]  # GGUF ne order: fastest dimension first
    np.testing.assert_array_equal(np.asarray(t.data).reshape(2, N_EMBD), prof.subspaces[3])


def _profile_with_meta(tmp_path: Path, meta_edit: Any = None, version: int = 1, subspaces: dict[int, np.ndarray] | None = None) -> Path:
    prof = make_profile()
    meta = json.loads(json.dumps({
        "name": prof.name, "site": prof.site, "method": prof.method, "axis": dict(prof.axis),
        "layer_stats": {}, "params": {}, "provenance": dict(prof.provenance),
    }))
    if meta_edit is not None:
        meta_edit(meta)
    subs = subspaces if subspaces is not None else {3: orthonormal(2, 3)}
    return gguf_writer_file(
        tmp_path / "p.gguf", "alignez-profile",
        [(KEY_VERSION, "uint32", version), (KEY_META, "string", json.dumps(meta))],
        [(f"subspace.{L}", a) for L, a in subs.items()],
    )


def test_profile_refusals(tmp_path: Path) -> None:
    path = _profile_with_meta(tmp_path, version=2)
    assert _err(path, load_profile) == (
        f"profile {path} has format version 2; this alignez-local reads version 1: upgrade alignez-local"
    )
    path = tmp_path / "p.gguf"
    path.write_bytes(raw_gguf([("general.architecture", 8, "alignez-profile"), (KEY_VERSION, 4, 1), (KEY_META, 8, "{not json")],
                              [("subspace.1", (N_EMBD, 1), 0, orthonormal(1, 1).tobytes())]))
    assert "not valid JSON" in _err(path, load_profile)
    path.write_bytes(raw_gguf([("general.architecture", 8, "alignez-profile"), (KEY_VERSION, 4, 1), (KEY_META, 8, "[" * 100000)],
                              [("subspace.1", (N_EMBD, 1), 0, orthonormal(1, 1).tobytes())]))
    assert "not valid JSON" in _err(path, load_profile)
    assert "lacks site" in _err(_profile_with_meta(tmp_path, lambda m: m.pop("site")), load_profile)
    assert "n_embd and n_layer" in _err(_profile_with_meta(tmp_path, lambda m: m["provenance"].pop("n_layer")), load_profile)
    assert "site 'attn'" in _err(_profile_with_meta(tmp_path, lambda m: m.update(site="attn")), load_profile)
    bad = orthonormal(2, 3) * 1.1
    assert "norm 1.1000" in _err(_profile_with_meta(tmp_path, subspaces={3: bad}), load_profile)
    skew = orthonormal(2, 3)
    skew[1] = (skew[0] + skew[1]) / np.linalg.norm(skew[0] + skew[1])
    assert "not orthogonal" in _err(_profile_with_meta(tmp_path, subspaces={3: skew}), load_profile)
    nan = orthonormal(1, 3)
    nan[0, 0] = np.nan
    assert "NaN" in _err(_profile_with_meta(tmp_path, subspaces={3: nan}), load_profile)
    assert "expected (k, 16)" in _err(_profile_with_meta(tmp_path, subspaces={3: orthonormal(1, 3, n=8)}), load_profile)
    assert "beyond the model's 10 layers" in _err(_profile_with_meta(tmp_path, subspaces={10: orthonormal(1, 3)}), load_profile)
    f16 = gguf_writer_file(tmp_path / "f16.gguf", "alignez-profile",
                           [(KEY_VERSION, "uint32", 1), (KEY_META, "string", "{}")],
                           [("subspace.1", orthonormal(1, 1).astype(np.float16))])
    assert "lacks" in _err(f16, load_profile)
    # Wrong kinds of file get a pointer to the right option.
    assert "is a model file, not a steering profile" in _err(fake_model(tmp_path / "m.gguf"), load_profile)
    cv = write_control_vector(tmp_path / "c.gguf", make_cv())
    assert "is a control vector, not a steering profile" in _err(cv, load_profile)


def test_profile_validates_on_construction() -> None:
    with pytest.raises(AlignezError, match="norm"):
        make_profile(subspaces={3: np.ones((1, N_EMBD), np.float32)})
    with pytest.raises(AlignezError, match="layer 12"):
        make_profile(subspaces={12: orthonormal(1, 1)})
    with pytest.raises(AlignezError, match="JSON"):
        make_profile(params={"f": object()})
    with pytest.raises(AlignezError, match="axis"):
        make_profile(axis={"name": "x"})
    prof = make_profile()
    with pytest.raises(TypeError):
        prof.params["x"] = 1  # type: ignore[index]
    with pytest.raises(ValueError):
        prof.subspaces[3][0, 0] = 1.0


def test_profile_check_compatible() -> None:
    prof = make_profile()
    assert prof.check_compatible(10, N_EMBD, "llama") == []
    with pytest.raises(AlignezError) as e:
        prof.check_compatible(18, 640, "gemma3")
    assert str(e.value) == (
        "profile helpful was made for a model with n_embd 16 and 10 layers, but this model has n_embd 640 "
        "and 18 layers; build a profile for this model"
    )
    with pytest.raises(AlignezError):
        prof.check_compatible(11, N_EMBD, "llama")
    assert prof.check_compatible(10, N_EMBD, "qwen2") == ["profile helpful was made for 'llama', model is 'qwen2'"]
    warn = prof.check_compatible(10, N_EMBD, "llama", model_sha256="ef" * 32)
    assert len(warn) == 1 and "another model file" in warn[0]


def test_gguf_package_exists() -> None:
    # The writer path depends on gguf.GGUFWriter; make the dependency explicit for the lead.
    assert hasattr(gguf, "GGUFWriter")


# --- default_strength and calibration (issue 10) -----------------------------------------------------

CALIB = {"strengths": [0.5, 1.0, 2.0], "kl": [0.01, 0.05, 0.3], "ppl_ratio": [1.0, 1.02, 1.2]}


def _llama_cpp_reads(path: Path) -> tuple[int, float | None]:
    """Return (tensor count, alignez.default_strength) as llama.cpp's own GGUF parser reads them."""
    import ctypes

    import llama_cpp

    from llama_cpp._ctypes_extensions import load_shared_library

    ggml = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    ggml.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    ggml.gguf_init_from_file.restype = ctypes.c_void_p
    ggml.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    ggml.gguf_get_n_tensors.restype = ctypes.c_int64
    ggml.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.gguf_find_key.restype = ctypes.c_int64
    ggml.gguf_get_val_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    ggml.gguf_get_val_f32.restype = ctypes.c_float
    ggml.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = ggml.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx, f"llama.cpp's gguf_init_from_file refused {path}"
    try:
        key = ggml.gguf_find_key(ctx, b"alignez.default_strength")
        value = float(ggml.gguf_get_val_f32(ctx, key)) if key >= 0 else None
        return int(ggml.gguf_get_n_tensors(ctx)), value
    finally:
        ggml.gguf_free(ctx)


def test_default_strength_round_trips_in_both_files(tmp_path: Path) -> None:
    cv = make_cv(default_strength=0.7, calibration=CALIB)
    assert cv.default_strength == pytest.approx(0.7) and cv.default_strength_or_one == cv.default_strength
    assert "default_strength=0.7)" in repr(cv)
    path = write_control_vector(tmp_path / "v.gguf", cv)
    raw = read_gguf(path)
    assert raw.value_types["alignez.default_strength"].kind == GGUFValueType.FLOAT32
    assert raw.value_types["alignez.calibration"].kind == GGUFValueType.STRING
    back = read_control_vector(path)
    assert back.default_strength == cv.default_strength  # F32-exact, so equal after the trip
    assert dict(back.calibration or {}) == CALIB
    assert "alignez.default_strength" not in back.metadata
    assert back == dataclasses.replace(cv, name="v")
    assert back.describe()["default_strength"] == cv.default_strength
    assert back != dataclasses.replace(back, default_strength=0.5)

    prof = make_profile(default_strength=-2.5, calibration=CALIB)
    assert "default_strength=-2.5)" in repr(prof)
    back_p = load_profile(save_profile(tmp_path / "p.gguf", prof))
    assert back_p == prof and back_p.default_strength == -2.5
    assert back_p.describe()["calibration"] == CALIB
    assert back_p != dataclasses.replace(prof, calibration=None)


def test_uncalibrated_files_have_no_key_and_default_to_one(tmp_path: Path) -> None:
    cv = make_cv()
    assert cv.default_strength is None and cv.calibration is None and cv.default_strength_or_one == 1.0
    path = write_control_vector(tmp_path / "v.gguf", cv)
    assert "alignez.default_strength" not in read_gguf(path).metadata
    assert read_control_vector(path).default_strength is None
    prof = load_profile(save_profile(tmp_path / "p.gguf", make_profile()))
    assert prof.default_strength is None and prof.default_strength_or_one == 1.0


def test_arithmetic_drops_the_calibration() -> None:
    cv = make_cv(default_strength=2.0, calibration=CALIB)
    for derived in (cv * 2, -cv, cv + cv, cv / 2):
        assert derived.default_strength is None and derived.calibration is None


@pytest.mark.parametrize("bad", [1000.0, -101, float("nan"), float("inf"), 1e39, "1", True])
def test_default_strength_is_checked(bad: Any) -> None:
    with pytest.raises(AlignezError, match="default_strength"):
        make_cv(default_strength=bad)
    with pytest.raises(AlignezError, match="default_strength"):
        make_profile(default_strength=bad)


def test_calibration_fields_are_refused_when_wrong(tmp_path: Path) -> None:
    with pytest.raises(AlignezError, match="through its own field"):
        make_cv(metadata={"alignez.default_strength": 1.0})
    with pytest.raises(AlignezError, match="calibration cannot be saved as JSON"):
        make_cv(calibration={"x": object()})
    vec = rng_vec(1)
    cases = {
        "wrong type": ([("alignez.default_strength", 4, 2)], "is UINT32, not a float"),
        "out of range": ([("alignez.default_strength", 6, 500.0)], "out of range"),
        "not json": ([("alignez.calibration", 8, "{oops")], "not a JSON object"),
        "json list": ([("alignez.calibration", 8, "[1]")], "not a JSON object"),
    }
    for label, (kvs, message) in cases.items():
        path = tmp_path / f"{label}.gguf"
        path.write_bytes(raw_gguf([("general.architecture", 8, "controlvector"), *kvs], [cv_tensor("direction.1", vec)]))
        with pytest.raises(AlignezError, match=message):
            read_control_vector(path)


def test_vector_with_default_strength_still_loads_in_llama_cpp(tmp_path: Path, tiny_engine: Any) -> None:
    e = tiny_engine
    rng = np.random.default_rng(3)
    dirs = {L: rng.standard_normal(e.n_embd).astype(np.float32) for L in range(1, e.n_layer)}
    path = write_control_vector(tmp_path / "calibrated.gguf", ControlVector(dirs, "llama", default_strength=1.5))
    assert _llama_cpp_reads(path) == (e.n_layer - 1, 1.5)
    cv = read_control_vector(path)
    assert cv.check_compatible(e.n_layer, e.n_embd, e.arch) == []
    prompts = [e.prompt("Hello")]
    base = e.next_token_logits(prompts)
    with e.control_vector({L: v * cv.default_strength_or_one for L, v in cv.directions.items()}):
        steered = e.next_token_logits(prompts)
    with e.control_vector({L: v * 1.5 for L, v in dirs.items()}):
        same = e.next_token_logits(prompts)
    assert np.abs(steered - base).max() > 0.01
    np.testing.assert_array_equal(steered, same)


SHIPPED = sorted((Path(__file__).parent.parent / "vectors").glob("*/*.gguf"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_files_still_load(path: Path) -> None:
    if path.name.endswith(".profile.gguf"):
        assert gguf_kind(path) == "profile" and load_profile(path).layers
    else:
        assert gguf_kind(path) == "control-vector"
        cv = read_control_vector(path)
        assert cv.layers and (cv.default_strength is None or cv.default_strength_or_one == cv.default_strength)
        assert _llama_cpp_reads(path)[0] == len(cv.layers)

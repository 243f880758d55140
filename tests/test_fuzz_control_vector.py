"""Fuzz the readers with corrupted control vector (and profile) files.

Every corrupted file must either load as a valid value or raise AlignezError: no other exception,
no hang, no large allocation. Deterministic: fixed seeds, no Hypothesis database.
"""

from __future__ import annotations

import random
import resource
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignez_local.formats import gguf_file
from alignez_local.formats.control_vector import ControlVector, read_control_vector, write_control_vector
from alignez_local.errors import AlignezError
from alignez_local.formats.gguf_file import read_gguf
from alignez_local.formats.kinds import gguf_kind
from alignez_local.formats.profile import SteeringProfile, load_profile, save_profile

N_EMBD = 16
SEED = 20261127
PER_CASE_SECONDS = 2.0
TOTAL_SECONDS = 60.0
MAX_TRACED_BYTES = 64 << 20
MAX_RSS_GROWTH_KB = 200 * 1024

U32_VALUES = [0, 1, 2, 7, 8, 9, 12, 13, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
U64_VALUES = [0, 1, 2, 63, 64, 65, 4096, 2**24, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@pytest.fixture(autouse=True)
def _strict_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    # A parser bug must fail the test as itself, not hide behind the user-facing catch-all.
    monkeypatch.setattr(gguf_file, "_RAISE_INTERNAL_ERRORS", True)


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(N_EMBD).astype(np.float32)
    return v / np.linalg.norm(v)


def base_ours(tmp: Path) -> bytes:
    """Return the bytes of a control vector written by our writer."""
    cv = ControlVector(
        {L: _vec(L) for L in (1, 2, 3, 5)},
        "llama",
        {"alignez.model.n_layer": 6, "alignez.method": "mean", "alignez.scale": 1.5},
        "base",
    )
    return write_control_vector(tmp / "base_ours.gguf", cv).read_bytes()


def base_rich(tmp: Path) -> bytes:
    """Return the bytes of a control vector with every kind of metadata, written by GGUFWriter."""
    path = tmp / "base_rich.gguf"
    w = GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", 4)
    w.add_array("alignez.tags", ["a", "bc", "def"])
    w.add_array("alignez.ints", [1, 2, 3, 4])
    w.add_bool("alignez.flag", True)
    w.add_float64("alignez.f", 0.5)
    for L in (1, 2, 3):
        w.add_tensor(f"direction.{L}", _vec(10 + L))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def int_slots(path: Path) -> list[tuple[int, int]]:
    """Return (offset, width) of every integer header field (lengths, counts, types, dims, offsets).

    Found with the gguf package's reader on the valid base file, independently of our parser.
    """
    r = GGUFReader(path)
    slots: list[tuple[int, int]] = []
    fields = [f for f in r.fields.values()] + [t.field for t in r.tensors]
    for f in fields:
        off = f.offset
        for part in f.parts:
            if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8):
                for i in range(part.size):
                    slots.append((off + i * part.dtype.itemsize, part.dtype.itemsize))
            off += part.nbytes
    return sorted(set(slots))


def tensor_info_spans(data: bytes, path: Path) -> list[tuple[int, int]]:
    """Return (start, end) byte spans of each tensor info record."""
    r = GGUFReader(path)
    spans = []
    for t in r.tensors:
        start = t.field.offset
        spans.append((start, start + sum(p.nbytes for p in t.field.parts)))
    return spans


def kv_spans(path: Path) -> list[tuple[int, int]]:
    """Return (start, end) byte spans of each real key/value record."""
    r = GGUFReader(path)
    return [
        (f.offset, f.offset + sum(p.nbytes for p in f.parts))
        for name, f in r.fields.items()
        if not name.startswith("GGUF.")
    ]


def mutations(data: bytes, path: Path, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Yield (label, corrupted bytes) variants of a valid GGUF file."""
    size = len(data)
    r = GGUFReader(path)
    data_start = r.data_offset
    # Truncations: every offset in the header, a stride through the data.
    for n in list(range(0, data_start + 8)) + list(range(data_start + 8, size, 7)):
        yield f"truncate@{n}", data[:n]
    # Interesting values written over every integer field.
    for off, width in int_slots(path):
        values = U32_VALUES if width == 4 else U64_VALUES + [size, size * 2, data_start]
        for v in values:
            b = bytearray(data)
            b[off : off + width] = v.to_bytes(width, "little")
            yield f"int@{off}={v}", bytes(b)
    # Random byte changes, mostly in the header where structure lives.
    for i in range(300):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(data_start) if rng.random() < 0.75 else rng.randrange(size)
            b[pos] = rng.randrange(256)
        yield f"bytes#{i}", bytes(b)
    for i in range(100):
        b = bytearray(data)
        pos = rng.randrange(data_start)
        b[pos] ^= 1 << rng.randrange(8)
        yield f"bit#{i}", bytes(b)
    # NaN / inf / huge values in the tensor data.
    for i, pattern in enumerate([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\xff\xff\xff\xff"] * 5):
        b = bytearray(data)
        pos = data_start + 4 * rng.randrange((size - data_start) // 4)
        b[pos : pos + 4] = pattern
        yield f"nan#{i}", bytes(b)
    # Duplicated tensor infos and key/value records, with the count bumped to match.
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    for start, end in tensor_info_spans(data, path):
        dup = data[:end] + data[start:end] + data[end:]
        yield f"dup-tensor@{start}", dup[:8] + struct.pack("<Q", n_tensors + 1) + dup[16:]
        yield f"dup-tensor-nocount@{start}", dup
    for start, end in kv_spans(path):
        dup = data[:end] + data[start:end] + data[end:]
        yield f"dup-kv@{start}", dup[:16] + struct.pack("<Q", n_kv + 1) + dup[24:]
    # Insertions and deletions that shift everything after them.
    for i in range(100):
        pos = rng.randrange(data_start)
        if rng.random() < 0.5:
            yield f"insert#{i}", data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[pos:]
        else:
            yield f"delete#{i}", data[:pos] + data[pos + rng.randint(1, 16) :]
    # Huge lengths spliced at random header positions.
    for i in range(60):
        b = bytearray(data)
        pos = rng.randrange(4, data_start - 8)
        b[pos : pos + 8] = rng.choice([2**63, 2**64 - 1, 2**40, size + 1]).to_bytes(8, "little")
        yield f"splice#{i}", bytes(b)


def check_cv(cv: ControlVector) -> None:
    """Assert that an accepted file gave a fully valid control vector."""
    assert isinstance(cv, ControlVector)
    assert cv.layers and all(1 <= L <= 4096 for L in cv.layers)
    widths = {v.shape for v in cv.directions.values()}
    assert len(widths) == 1 and len(next(iter(widths))) == 1
    assert 1 <= cv.n_embd <= 65536
    for v in cv.directions.values():
        assert v.dtype == np.float32 and np.all(np.isfinite(v))


def run_case(path: Path, data: bytes, label: str, reader: Callable[[Path], Any], check: Callable[[Any], None]) -> str:
    """Return "accepted" or "refused" for one corrupted file; fail on anything else."""
    path.write_bytes(data)
    t0 = time.perf_counter()
    outcome = "refused"
    try:
        value = reader(path)
    except AlignezError as err:
        msg = str(err)
        assert msg and "\n" not in msg, label
    else:
        check(value)
        outcome = "accepted"
        # Something we load as a control vector must also be identified as one.
        kind = gguf_kind(path)
        assert kind in ("control-vector", "profile"), (label, kind)
    try:
        assert gguf_kind(path) in ("model", "control-vector", "profile")
    except AlignezError:
        pass
    try:
        read_gguf(path)  # the generic reader with arrays and data materialised
    except AlignezError:
        pass
    elapsed = time.perf_counter() - t0
    assert elapsed < PER_CASE_SECONDS, f"{label} took {elapsed:.2f} s"
    return outcome


def test_fuzz_control_vector_reader(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cases: list[tuple[str, bytes]] = []
    for make in (base_ours, base_rich):
        data = make(tmp_path)
        src = tmp_path / f"{make.__name__}.gguf"
        read_control_vector(src)  # the base itself is valid
        cases.extend((f"{make.__name__}:{label}", b) for label, b in mutations(data, src, rng))
    assert len(cases) >= 1000, len(cases)

    target = tmp_path / "case.gguf"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.perf_counter()
    counts = {"accepted": 0, "refused": 0}
    try:
        for label, data in cases:
            counts[run_case(target, data, label, read_control_vector, check_cv)] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = time.perf_counter() - started
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert total < TOTAL_SECONDS, f"fuzz took {total:.1f} s"
    assert peak < MAX_TRACED_BYTES, f"peak traced allocation {peak} bytes"
    assert rss_growth < MAX_RSS_GROWTH_KB, f"max RSS grew by {rss_growth} KiB"
    # Both outcomes must occur, or the mutations are not exercising the reader.
    assert counts["accepted"] > 0 and counts["refused"] > 0, counts


def _profile_bytes(tmp: Path) -> tuple[bytes, Path]:
    subs = {}
    for L, k in ((2, 2), (4, 1)):
        q, _ = np.linalg.qr(np.random.default_rng(L).standard_normal((N_EMBD, k)))
        subs[L] = q.T.astype(np.float32)
    prof = SteeringProfile(
        subspaces=subs, site="l_out", method="svd", axis={"name": "a", "positive": "p", "negative": "n"},
        layer_stats={2: {"heldout_accuracy": 0.75}}, params={"alpha": 1.0},
        provenance={"n_embd": N_EMBD, "n_layer": 6, "arch": "llama"}, name="fz",
    )
    path = save_profile(tmp / "base_profile.gguf", prof)
    return path.read_bytes(), path


def check_profile(p: SteeringProfile) -> None:
    """Assert that an accepted file gave a valid profile."""
    assert isinstance(p, SteeringProfile) and p.layers
    for sub in p.subspaces.values():
        assert sub.dtype == np.float32 and sub.ndim == 2 and sub.shape[1] == p.n_embd
        assert np.all(np.isfinite(sub))
        np.testing.assert_allclose(np.linalg.norm(sub, axis=1), 1.0, atol=1.1e-3)


def test_fuzz_profile_reader(tmp_path: Path) -> None:
    data, src = _profile_bytes(tmp_path)
    load_profile(src)
    rng = random.Random(SEED + 1)
    cases = list(mutations(data, src, rng))
    assert len(cases) >= 500
    target = tmp_path / "case.gguf"
    started = time.perf_counter()
    for label, b in cases:
        run_case(target, b, label, load_profile, check_profile)
    assert time.perf_counter() - started < TOTAL_SECONDS


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_hypothesis_byte_edits(tmp_path: Path, edits: list[tuple[int, int]], cut: int | None) -> None:
    base = tmp_path / "base_ours.gguf"
    if not base.exists():
        base_ours(tmp_path)
    data = bytearray(base.read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    run_case(tmp_path / "case.gguf", bytes(data), f"hyp {edits} {cut}", read_control_vector, check_cv)

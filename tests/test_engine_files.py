"""Vectors in other tools' files (formats/engines.py, docs/engines.md): export then import gives the
same directions and layers for every tool, the layer key moves where the tool counts otherwise (IBM),
the strength is folded in and divided out again, and the GGUF files are what repeng and EasySteer
read (a file written the way repeng writes is read in tests/test_formats.py). No model, no torch:
a few seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from alignez_local.apps.cli import main
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import ControlVector, read_control_vector, write_control_vector
from alignez_local.formats.engines import ENGINES, read_from_engine, write_for_engine

FRENCH = Path(__file__).resolve().parents[1] / "vectors" / "qwen2.5-coder-0.5b-instruct" / "french.gguf"



def _vector(strength: float | None = 0.3, layers: range = range(3, 7), n_layer: int = 8) -> ControlVector:
    rng = np.random.default_rng(0)
    return ControlVector(directions={L: rng.normal(size=16).astype(np.float32) for L in layers}, model_hint="llama",
                         metadata={"alignez.model.n_layer": n_layer, "alignez.axis": "test"}, name="t",
                         default_strength=strength)


def _engines() -> list[str]:
    have_st = importlib.util.find_spec("safetensors") is not None  # the engines extra
    return [e for e in ENGINES if e != "steering-vectors" or have_st]


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("fold", [True, False])
def test_export_then_import_gives_the_same_directions_layers_and_strength(engine: str, fold: bool, tmp_path: Path) -> None:
    cv = _vector()
    out = tmp_path / f"v{ENGINES[engine].suffix}"
    done = write_for_engine(cv, engine, out, fold=fold)
    assert done.layers == [L + ENGINES[engine].shift for L in cv.layers]
    assert (done.scale, done.folded) == ((1.0, cv.default_strength) if fold else (cv.default_strength, None))
    back = read_from_engine(out, engine)
    assert back.layers == cv.layers
    assert back.default_strength == cv.default_strength
    assert back.model_hint == "llama" and back.metadata["alignez.axis"] == "test"
    for L in cv.layers:
        if fold:  # multiplied and divided in float64, stored float32: within one rounding
            np.testing.assert_allclose(back.directions[L], cv.directions[L], rtol=2 ** -23, atol=0)
        else:
            assert np.array_equal(back.directions[L], cv.directions[L])


def test_the_shipped_french_vector_round_trips_through_the_cli(tmp_path: Path) -> None:
    cv = read_control_vector(FRENCH)
    runner = CliRunner()
    for engine in ("repeng", "ibm"):
        out = tmp_path / f"french{ENGINES[engine].suffix}"
        res = runner.invoke(main, ["export", "--vector", str(FRENCH), "--to", engine, "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert f"strength {cv.default_strength:g} folded in" in res.output
        clean = tmp_path / f"back-{engine}.gguf"
        res = runner.invoke(main, ["import", str(out), "--from", engine, "-o", str(clean)])
        assert res.exit_code == 0, res.output
        back = read_control_vector(clean)
        assert back.layers == cv.layers and back.default_strength == pytest.approx(cv.default_strength, rel=2 ** -23)
        for L in cv.layers:  # folded and divided out again: within a float32 rounding or two
            np.testing.assert_allclose(back.directions[L], cv.directions[L], rtol=2 ** -22, atol=0)


def test_ibm_keys_are_one_layer_later_and_hold_the_folded_vector(tmp_path: Path) -> None:
    cv = _vector(strength=0.5)
    write_for_engine(cv, "ibm", tmp_path / "v.svec")
    data = json.loads((tmp_path / "v.svec").read_text())
    # What activation_steering.SteeringVector.load reads: model_type, directions, explained_variances.
    assert data["model_type"] == "llama" and data["explained_variances"] == {}
    assert sorted(int(k) for k in data["directions"]) == [L + 1 for L in cv.layers]
    np.testing.assert_array_equal(np.float32(data["directions"]["4"]), cv.directions[3] * np.float32(0.5))


def test_ibm_cannot_reach_past_the_last_layer(tmp_path: Path) -> None:
    with pytest.raises(AlignezError, match="the model's last"):
        write_for_engine(_vector(layers=range(5, 8), n_layer=8), "ibm", tmp_path / "v.svec")


@pytest.mark.parametrize("key", [0, 1])
def test_an_ibm_key_llama_cpp_cannot_steer_is_refused(key: int, tmp_path: Path) -> None:
    path = tmp_path / "v.svec"
    path.write_text(json.dumps({"model_type": "llama", "directions": {str(key): [0.5] * 4}, "explained_variances": {}}))
    with pytest.raises(AlignezError, match=f"input of block {key}"):
        read_from_engine(path)


def test_our_gguf_is_what_repeng_and_easysteer_read(tmp_path: Path) -> None:
    """Read back with gguf's own reader the way both tools' import_gguf do: the architecture, a model
    hint (both raise without one) and direction.N tensors, N = the layer."""
    cv = ControlVector(directions={2: np.arange(8, dtype=np.float32)}, name="nohint", default_strength=2.0)
    write_for_engine(cv, "repeng", tmp_path / "v.gguf")
    reader = gguf.GGUFReader(tmp_path / "v.gguf")
    field = reader.get_field("general.architecture")
    assert str(bytes(field.parts[-1]), "utf-8") == "controlvector"
    hint = reader.get_field("controlvector.model_hint")
    assert hint is not None and str(bytes(hint.parts[-1]), "utf-8") == "unknown"
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert list(tensors) == ["direction.2"]
    np.testing.assert_array_equal(tensors["direction.2"], np.arange(8, dtype=np.float32) * 2)


def test_steering_vectors_file_is_layer_tensors_with_our_record(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    cv = _vector(strength=0.25)
    write_for_engine(cv, "steering-vectors", tmp_path / "v.safetensors")
    tensors = st.load_file(str(tmp_path / "v.safetensors"))
    assert sorted(tensors, key=int) == [str(L) for L in cv.layers]
    np.testing.assert_array_equal(tensors["3"], cv.directions[3] * np.float32(0.25))


def test_an_answer_only_vector_exports_with_a_warning(tmp_path: Path) -> None:
    cv = _vector().placed("answer-only")
    said: list[str] = []
    write_for_engine(cv, "easysteer", tmp_path / "v.gguf", on_warning=said.append)
    assert any("every token" in s for s in said)


def test_export_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["export", "--to", "repeng", "-o", str(tmp_path / "v.gguf")])
    assert res.exit_code != 0 and "--vector FILE and --to TOOL" in res.output
    res = runner.invoke(main, ["import", str(tmp_path / "v.bin"), "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "--from" in res.output


def test_unfolded_gguf_keeps_the_file_bit_for_bit(tmp_path: Path) -> None:
    write_control_vector(tmp_path / "ours.gguf", _vector())
    cv = read_control_vector(tmp_path / "ours.gguf")
    write_for_engine(cv, "easysteer", tmp_path / "e.gguf", fold=False)
    back = read_from_engine(tmp_path / "e.gguf", "easysteer")
    assert back.calibration == cv.calibration and back.default_strength == cv.default_strength
    assert all(np.array_equal(back.directions[L], cv.directions[L]) for L in cv.layers)

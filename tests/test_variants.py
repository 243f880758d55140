"""Variants of steer's vector (issue 31, part 1: which layers, which pooling): other fits from the same
pairs, searched beside the default vector on the choose half; the file holds the one chosen."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignez_local.align.directions import random_like
from alignez_local.align.layer_scan import SCAN_FACTORS, LayerScan, scan_layers
from alignez_local.align.steering import Steering
from alignez_local.align.strength_by_behaviour import choose_strengths, way_name, way_parts, way_variant
from alignez_local.align.variants import VARIANT_KEY, Variant, check_variants, parse_variants
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import ANSWER_ONLY, CLAMP, EVERY_TOKEN, ControlVector, read_control_vector
from alignez_local.llama.engine import Engine

from test_behaviour import GRID, _bench, _planted


def test_variants_parse_in_order_once_each_and_bad_ones_are_one_line() -> None:
    got = parse_variants("pool:last, layers:4,8 ,layers:12,pool:last")
    assert [v.name for v in got] == ["pool:last", "layers:4,8", "layers:12"]
    assert got[0].pool == "last" and got[1].layers == "4,8" and got[1].layer_list(24, [8, 9]) == [4, 8]
    assert parse_variants(None) == () and parse_variants(["layers:3-5"]) == (Variant("layers:3-5", layers="3-5"),)
    for bad in ("pool:first", "layers:", "depth:3", "last"):
        with pytest.raises(AlignezError, match="--variants: unknown variant") as err:
            parse_variants(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(AlignezError, match="outside 1..23"):
        parse_variants("layers:30")[0].layer_list(24, [8])


def test_a_variant_that_is_the_default_vector_is_refused() -> None:
    check_variants(parse_variants("pool:last,layers:9"), "mean", [8, 9, 10], 24)  # both differ from the default
    for same in ("pool:mean", "layers:8-10"):
        with pytest.raises(AlignezError, match="is the default vector itself"):
            check_variants(parse_variants(same), "mean", [8, 9, 10], 24)


def test_way_names_carry_the_variant_and_read_back() -> None:
    assert way_name(EVERY_TOKEN) == EVERY_TOKEN  # the default's name is unchanged (old files read the same)
    name = way_name(ANSWER_ONLY, CLAMP, "layers:4,8")
    assert name == "answer-only, clamp; layers:4,8"
    assert way_parts(name) == (ANSWER_ONLY, CLAMP) and way_variant(name) == "layers:4,8"
    assert way_parts(way_name(EVERY_TOKEN, variant="pool:last")) == (EVERY_TOKEN, "add")
    assert way_variant(EVERY_TOKEN) == ""


def test_the_search_picks_a_planted_better_variant(tiny_engine: Engine, tiny_model_path: Path) -> None:
    """The default vector is a random direction (it makes nothing); a variant is the planted one (it
    makes the model say " the"). The search must choose the variant, and the calibration says so."""
    e = tiny_engine
    planted = _planted(e, tiny_model_path, 1.0)
    decoy = ControlVector(random_like(dict(planted.directions), seed=11), model_hint=e.arch)
    lines: list[str] = []
    cal = choose_strengths(_bench(e), None, decoy, 5, lines.append, strengths=GRID, refine=False,
                           variants={"layers:3": (planted, None)})["vector"]
    assert cal.variant == "layers:3" and cal.placements["chosen"] == way_name(EVERY_TOKEN, variant="layers:3")
    tried = cal.placements["tried"]
    assert set(tried) == {EVERY_TOKEN, "every-token; layers:3"}
    assert tried["every-token; layers:3"]["combined"] > tried[EVERY_TOKEN]["combined"]
    assert cal.trials and all(t.strength in GRID for t in cal.trials)  # the report is the variant's own search
    assert any(line.startswith("ways (choose half") and line.endswith("chosen: every-token; layers:3") for line in lines)


def _steer(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alignez_local", "steer", "-m", str(model), "--limit", "12",
                           "--response-tokens", "24", "--strengths", "1,8", "--threads", "1", *extra, "-o", str(out)],
                          capture_output=True, text=True, timeout=600)


def test_steer_searches_the_variants_and_writes_the_one_chosen(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _steer(tiny_model_path, out, "--variants", "pool:last,layers:2")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    ways = report["calibration"]["vector"]["placements"]
    assert set(ways["tried"]) == {EVERY_TOKEN, "every-token; pool:last", "every-token; layers:2"}
    cv = read_control_vector(out / "vector.gguf")
    chosen = way_variant(ways["chosen"])
    assert cv.metadata.get(VARIANT_KEY, "") == chosen
    assert cv.layers == ([2] if chosen == "layers:2" else [1])  # the tiny model's middle third is layer 1
    assert "ways (choose half" in res.stdout + res.stderr
    # The same pairs again, with a variant that is the default vector: one line, before any search.
    again = _steer(tiny_model_path, out, "--variants", "layers:1")
    assert again.returncode != 0 and "is the default vector itself" in again.stderr
    assert "Traceback" not in again.stderr
    bad = _steer(tiny_model_path, tmp_path / "bad", "--variants", "pool:first")
    assert bad.returncode != 0 and "--variants: unknown variant 'pool:first'" in bad.stderr
    assert not (tmp_path / "bad").exists()
    harmless = subprocess.run([sys.executable, "-m", "alignez_local", "steer", "-m", str(tiny_model_path), "--axis", "harmless",
                               "--variants", "pool:last", "-o", str(tmp_path / "h")], capture_output=True, text=True, timeout=120)
    assert harmless.returncode != 0 and "run it without --variants" in harmless.stderr and not (tmp_path / "h").exists()


def test_the_last_token_variant_is_read_from_another_capture(tiny_model_path: Path, tmp_path: Path) -> None:
    """pool:last is the difference of the answers' last-token states, not the mean's: the variant's
    vector differs from the default's on the same layer."""
    out = tmp_path / "run"
    res = _steer(tiny_model_path, out, "--variants", "pool:last", "--strengths", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    from alignez_local.align.vectors import FitSettings, fit_with_difference
    from alignez_local.models import ModelId
    with Engine(tiny_model_path, n_threads=1) as e:
        fitted = fit_with_difference(e, out / "preferences.jsonl", FitSettings(), ModelId.of(e), other_pools=["last"])
    assert fitted.pool == "mean" and set(fitted.differences) == {"mean", "last"}
    assert not np.allclose(fitted.differences["mean"][1], fitted.differences["last"][1])


# --- layers:scan (align/layer_scan.py) -----------------------------------------------------------

def test_a_layer_scan_finds_the_planted_layer(tiny_engine: Engine, tiny_model_path: Path) -> None:
    """Every layer but the last gets a random direction (it makes nothing); the last gets the planted
    one (it makes the model say " the"). The scan tries each at 4x and 8x the base strength on the
    choose half and must pick the last layer; its record keeps each layer's best trial in brief."""
    e = tiny_engine
    planted = _planted(e, tiny_model_path, 1.0)
    last = e.n_layer - 1
    decoys = {L: ControlVector(random_like({L: planted.directions[last]}, seed=20 + L), model_hint=e.arch)
              for L in range(1, last)}

    def steering(layer: int, s: float) -> Steering:
        return Steering.vector(planted if layer == last else decoys[layer], s)

    seen: list[tuple[int, float]] = []
    found = scan_layers(_bench(e), LayerScan(steering, list(range(1, e.n_layer))), 4.0,
                        on_trial=lambda L, t: seen.append((L, t.strength)))
    assert found.layer == last
    assert seen == [(L, k * 4.0) for L in range(1, e.n_layer) for k in SCAN_FACTORS]  # one trial each, no search
    rec = found.record()
    assert rec["chosen"] == last and set(rec["layers"]) == {str(L) for L in range(1, e.n_layer)}
    assert rec["layers"][str(last)]["combined"] > max(rec["layers"][str(L)]["combined"] for L in range(1, last))


def test_steer_with_a_layer_scan_writes_the_layer_it_chose(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "scan"
    res = _steer(tiny_model_path, out, "--variants", "layers:scan")
    assert res.returncode == 0, res.stderr[-2000:]
    said = res.stdout + res.stderr
    assert "layer scan:" in said and "scan layer 2 x" in said
    ways = json.loads((out / "report.json").read_text())["calibration"]["vector"]["placements"]
    scan = ways["scan"]
    layer = scan["chosen"]
    assert set(scan["layers"]) == {str(L) for L in range(2, 4)}  # every layer but the default's own (1)
    assert set(ways["tried"]) == {EVERY_TOKEN, f"every-token; layers:{layer}"}
    cv = read_control_vector(out / "vector.gguf")
    assert cv.layers == ([layer] if way_variant(ways["chosen"]) else [1])
    assert cv.metadata.get(VARIANT_KEY, "") == way_variant(ways["chosen"])
    # The chosen layer's search starts at the grid strength (1, 8) just below the scan's best trial.
    found = scan["layers"][str(layer)]["strength"]
    first = re.search(rf"vector \(every-token; layers:{layer}\) x([0-9.]+)", said)
    assert first and float(first.group(1)) == max([g for g in (1.0, 8.0) if g <= found], default=1.0)

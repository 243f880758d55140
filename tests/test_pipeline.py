"""AlignEZ end to end on the tiny model: generate -> fit -> exact edit -> export, resume after a
kill, layer indices through the engine, and the steer command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from alignez_local.align.axes import get_axis
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.align.edit import edit_delta, plan_edit
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.align.export import approximation_report, constant_vector
from alignez_local.align.fit import fit_profile
from alignez_local.align.preferences import GenerationSettings, generate_preferences, load_pairs
from alignez_local.formats.profile import load_profile, save_profile
from alignez_local.prompt_sets import load_queries
from alignez_local.align.steering import ProfileSlot, Steering, VectorSlot
from alignez_local.evaluation.behaviour_eval import axis_of
from alignez_local.formats.control_vector import ControlVector, write_control_vector
from alignez_local.models import file_sha256
from alignez_local.models import ModelId
from alignez_local.pipeline import SteerPaths
from alignez_local.align.vectors import FitSettings, fit_from_file
from alignez_local.formats.inspect import describe, import_vector
from alignez_local.specs import SteeringSpec

CLI = [sys.executable, "-m", "alignez_local"]
FAST = GenerationSettings(characteristics_tokens=12, response_tokens=24)


@pytest.fixture(scope="module")
def prefs(tiny_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    written, had = generate_preferences(tiny_engine, load_queries()[:24], get_axis("helpful"), out, FAST, quiet=True)
    assert (written, had) == (24, 0)
    return out


@pytest.fixture(scope="module")
def profile(tiny_engine: Engine, prefs: Path):
    pairs = load_pairs(prefs)
    return fit_profile(tiny_engine, pairs, {"name": "helpful", "positive": "p", "negative": "n"}, quiet=True,
                       layers=[1, 2, 3], model_sha256="x" * 64)


def test_generated_records_are_complete(prefs: Path) -> None:
    recs = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert len({r["id"] for r in recs}) == 24
    for r in recs:
        assert r["axis"]["name"] == "helpful"
        assert set(r["characteristics"]) == set(r["response"]) == {"positive", "negative"}
        assert r["model"]["arch"] == "llama" and r["sampling"]["response_tokens"] == 24
        # nothing of the conditioning instruction is in the response text that gets embedded
        assert "You are a" not in r["response"]["positive"]


def test_rerun_adds_nothing(tiny_engine: Engine, prefs: Path) -> None:
    before = prefs.read_bytes()
    written, had = generate_preferences(tiny_engine, load_queries()[:24], get_axis("helpful"), prefs, FAST, quiet=True)
    assert (written, had) == (0, 24)
    assert prefs.read_bytes() == before


def test_queries_of_pairs_already_saved_are_never_held_out(prefs: Path, tmp_path: Path) -> None:
    """Every pair in a run's file is fitted: a run continued with a smaller --limit must not choose
    or report its strength on the queries of the pairs it did not ask for this time."""
    paths = SteerPaths.prepare(tmp_path / "run")
    assert paths.fitted_queries(["a", "b"]) == ["a", "b"]  # no file yet
    paths.preferences.write_bytes(prefs.read_bytes())
    saved = [p.query for p in load_pairs(prefs)]
    got = paths.fitted_queries(saved[:5] + ["a"])
    assert got[:6] == saved[:5] + ["a"] and set(got) == set(saved) | {"a"} and len(got) == len(set(got))


def test_profile_holds_subspaces_and_provenance(profile, tmp_path: Path) -> None:
    assert profile.layers == [1, 2, 3] and profile.site == "ffn_out" and profile.method == "svd"
    for s in profile.subspaces.values():
        np.testing.assert_allclose(s @ s.T, np.eye(s.shape[0]), atol=1e-4)
    assert profile.provenance["n_embd"] == 64 and len(profile.provenance["data_sha256"]) == 64
    assert set(profile.layer_stats) == {1, 2, 3}
    path = tmp_path / "p.gguf"
    save_profile(path, profile)
    assert load_profile(path) == profile


def test_exact_edit_runs_inside_the_forward_pass(tiny_engine: Engine, profile) -> None:
    e = tiny_engine
    prompts = [e.prompt(q) for q in ["how do I cook rice", "what is the moon", "write a poem"]]
    st = Steering(profiles=[ProfileSlot("p", profile)], top_n=1)
    x = e.capture(prompts, profile.layers, site="ffn_out")
    plans = [plan_edit({L: x[i, j] for j, L in enumerate(profile.layers)}, dict(profile.subspaces), top_n=1) for i in range(3)]
    with st.applied(e, prompts):
        y = e.capture(prompts, profile.layers, site="ffn_out")
    for i, plan in enumerate(plans):
        (layer,) = plan.directions  # top_n=1: one layer per prompt
        j = profile.layers.index(layer)
        for jj in range(j):  # layers before the edited one are untouched
            np.testing.assert_array_equal(y[i, jj], x[i, jj])
        np.testing.assert_allclose(y[i, j], x[i, j] + edit_delta(x[i, j], plan.directions[layer]), rtol=1e-5, atol=1e-5)
    # steering changes generation, strength 0 is exactly unsteered, and nothing leaks afterwards
    sp = Sampling(max_tokens=12)
    base = [c.text for c in e.generate(prompts, sp)]
    strong = Steering(profiles=[ProfileSlot("p", profile, strength=8.0)], top_n=3)
    assert [c.text for c in strong.generate(e, prompts, sp)] != base
    assert [c.text for c in Steering(profiles=[ProfileSlot("p", profile, strength=0.0)]).generate(e, prompts, sp)] == base
    assert [c.text for c in e.generate(prompts, sp)] == base


def test_profiles_add_their_deltas_by_strength(tiny_engine: Engine, profile) -> None:
    # Two profiles combine as the strength-weighted sum of their deltas: 0.75 + 0.25 of one
    # profile edits exactly like the profile at strength 1 (and unlike it at 0.5).
    e = tiny_engine
    prompts = [e.prompt(q) for q in ["how do I cook rice", "what is the moon"]]

    def edited(*slots: ProfileSlot):
        with Steering(profiles=list(slots), top_n=2).applied(e, prompts):
            return e.capture(prompts, profile.layers, site="ffn_out")

    whole = edited(ProfileSlot("p", profile, 1.0))
    np.testing.assert_allclose(edited(ProfileSlot("a", profile, 0.75), ProfileSlot("b", profile, 0.25)), whole, rtol=1e-4, atol=1e-4)
    assert not np.allclose(edited(ProfileSlot("p", profile, 0.5)), whole, rtol=1e-4, atol=1e-4)


def test_export_follows_llama_cpp_loader_rules(tiny_engine: Engine, profile, tmp_path: Path) -> None:
    from alignez_local.formats.control_vector import write_control_vector

    e = tiny_engine
    prompts = [e.prompt(q) for q in load_queries()[:16]]
    cv = constant_vector(e, profile, prompts, top_n=2)
    path = tmp_path / "v.gguf"
    write_control_vector(path, cv)
    r = gguf.GGUFReader(str(path))
    names = [t.name for t in r.tensors]
    assert names and all(n.startswith("direction.") and int(n.split(".")[1]) >= 1 for n in names)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 and int(t.shape[0]) == 64 for t in r.tensors)
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = r.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    assert "controlvector.layer_count" in r.fields
    back = read_control_vector(path)
    assert back.layers == cv.layers and all(np.array_equal(back.directions[L], cv.directions[L]) for L in cv.layers)
    # the vector lands on l_out-N of the layer it is named for, and nowhere earlier
    L = back.layers[0]
    before = e.capture(prompts[:2], [L - 1, L], site="l_out")
    with e.control_vector(dict(back.directions)):
        after = e.capture(prompts[:2], [L - 1, L], site="l_out")
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    np.testing.assert_allclose(after[:, 1] - before[:, 1], np.broadcast_to(back.directions[L], (2, 64)), atol=1e-4)
    rep = approximation_report(e, profile, back, prompts[:4], top_n=2)
    assert rep.n_prompts == 4 and rep.kl_exact_vs_unsteered >= 0 and rep.kl_vector_vs_unsteered > 0


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_generate_survives_sigkill(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    cmd = CLI + ["generate", "-m", str(tiny_model_path), "--limit", "120", "--response-tokens", "48", "--threads", "1", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_lines(out)) < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_bytes()
    n_first = len(_lines(out))
    assert 0 < n_first < 120, "the kill must land mid-run"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{120 - n_first} new pairs, {n_first} already there" in done.stdout
    recs = [json.loads(line) for line in _lines(out)]  # every line is complete JSON
    assert len(recs) == 120 and len({r["id"] for r in recs}) == 120
    complete = first[: first.rfind(b"\n") + 1]
    assert out.read_bytes().startswith(complete), "records written before the kill are kept as they were"


STEER = ["--limit", "12", "--response-tokens", "24", "--strengths", "1,8", "--threads", "1"]


def test_steer_end_to_end(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), *STEER, "--calibrate-profile", "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    prof = load_profile(out / "profile.gguf")
    cv = read_control_vector(out / "vector.gguf")
    rep = json.loads((out / "report.json").read_text())
    assert rep["layers"] == prof.layers and rep["recipe"] == "plain"
    # the mean-diff vector steers the middle third of the layers (tiny model: 4 layers -> layer 1)
    assert cv.layers == [1] and cv.metadata["alignez.source"] == "mean-diff:l_out"
    assert rep["approximation"]["n_prompts"] == 16 and rep["timings"]["total_s"] > 0
    # what each stage cost (scripts/bench_cost.py): generation samples tokens, fitting only reads,
    # and the screen's and calibration's answers are both sampled and read back for scoring
    costs = rep["costs"]
    assert set(costs) == {"screen", "generate", "fit", "export", "calibrate"}
    assert costs["generate"]["tokens_sampled"] > 0 and costs["fit"]["tokens_sampled"] == 0
    assert costs["fit"]["tokens_read"] > 0 and costs["calibrate"]["tokens_read"] > costs["calibrate"]["tokens_sampled"] > 0
    assert all(c["peak_rss_mb"] > 0 and c["cpu_s"] >= 0 for c in costs.values())
    # provenance: the model by file name and SHA-256 (no bundled name: it was given as a path), and
    # the run's files relative to the report; no absolute path anywhere
    assert rep["model"]["name"] is None and rep["model"]["file"] == tiny_model_path.name
    assert rep["model"]["sha256"] == file_sha256(tiny_model_path) == prof.provenance["model_sha256"]
    assert rep["profile"] == "profile.gguf" and rep["vector"] == "vector.gguf"
    assert str(tmp_path) not in json.dumps(rep) and str(tiny_model_path.parent) not in json.dumps(dict(prof.provenance))
    assert "exact edit   vs control vec" in res.stdout
    # screened first; a default strength chosen by the behaviour for both files, from the grid given
    assert "screen: asked by a system prompt" in res.stderr
    assert prof.default_strength is not None and cv.default_strength in (1.0, 8.0)
    assert rep["default_strength"] == {"profile": prof.default_strength, "vector": cv.default_strength}
    for cal, obj in ((rep["calibration"]["profile"], prof), (rep["calibration"]["vector"], cv)):
        assert cal["rule"] == "behaviour" and cal["strength"] == pytest.approx(obj.default_strength)
        assert cal["choose_queries"] == 8 and cal["report_queries"] == 16 and cal["trials"]
        assert set(cal["report"]) == {"unsteered", "prompting", "random", "steered"}
        assert isinstance(cal["beats_random"], bool) and cal["verdict"]
        assert dict(obj.calibration or {})["verdict"] == cal["verdict"]  # the file says it too
    # the behaviour table, side by side: unsteered, prompting, and per file steered and random
    table = rep["behaviour"]
    assert {"unsteered", "prompting"} <= set(table) and sum(k.startswith("random direction") for k in table) == 2
    for row in table.values():
        assert {"behaviour_rate", "relevance", "fluency", "combined"} <= set(row) and row["n"] == 16
    assert "behaviour on 16 held-out queries (strength chosen on 8 others)" in res.stdout
    assert f"--control-vector-scaled {out / 'vector.gguf'}:{cv.default_strength:g}" in res.stdout
    shown = subprocess.run(CLI + ["inspect", str(out / "vector.gguf")], capture_output=True, text=True, timeout=60)
    assert "beats_random" in shown.stdout and "verdict" in shown.stdout
    again = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), *STEER, "-o", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 new pairs, 12 already there" in again.stderr
    # without --calibrate-profile only the vector is calibrated; the profile keeps no strength
    rep = json.loads((out / "report.json").read_text())
    assert rep["calibration"]["profile"] is None and rep["calibration"]["vector"]["rule"] == "behaviour"
    assert load_profile(out / "profile.gguf").default_strength is None


def test_steer_writes_the_way_it_chose_even_when_only_one_was_tried(tiny_model_path: Path, tmp_path: Path) -> None:
    """``--forms clamp`` alone: the file is a clamp file with its floors (a single way other than the
    default once came out as a plain every-token file), and steer gives llama.cpp no strength for it."""
    out = tmp_path / "run"
    res = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), *STEER, "--forms", "clamp", "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    cv = read_control_vector(out / "vector.gguf")
    assert cv.form == "clamp" and set(cv.clamp_floor) == set(cv.layers)
    assert dict(cv.calibration or {})["placements"]["chosen"] == "every-token, clamp"
    assert "llama.cpp cannot apply every-token, clamp" in res.stdout and "--control-vector-scaled" not in res.stdout
    bad = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), *STEER, "--forms", "rotate", "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--forms: unknown form 'rotate'" in bad.stderr and "Traceback" not in bad.stderr


def test_steer_screen_only_measures_the_ceiling_and_writes_nothing(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    res = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), "--axis", "french", "--screen-only", "--threads", "1", "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "screen: asked by a system prompt" in res.stderr and "answers in French in" in res.stderr
    assert "a vector is unlikely to do better" in res.stderr  # the random model speaks no French when asked
    assert not out.exists()


def test_a_custom_axis_keeps_its_measure_in_its_files(tiny_model_path: Path, tmp_path: Path) -> None:
    """--measure picks the checker of a custom axis; the vector and profile say it, so `alignez eval`
    scores the file the way steer chose its strength."""
    out = tmp_path / "run"
    res = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), "--positive", "terse", "--negative", "wordy",
                                "--measure", "brevity:12", "--max-cos", "1", *STEER, "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "answers of at most 12 words" in res.stderr  # the screen line names the checker, no judge loaded
    cv = read_control_vector(out / "vector.gguf")
    assert cv.metadata["alignez.axis.measure"] == "brevity:12"
    assert load_profile(out / "profile.gguf").axis["measure"] == "brevity:12"
    assert json.loads((out / "report.json").read_text())["axis"]["measure"] == "brevity:12"
    axis = axis_of(Steering(vectors=[VectorSlot("v", cv, 1.0)]))
    assert axis is not None and axis.positive == "terse" and axis.measure == "brevity:12"
    # a language persona needs no --measure; a wrong key fails before any work, in one line
    spanish = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), "--positive", "Spanish", "--negative", "English",
                                    "--screen-only", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert spanish.returncode == 0 and "answers in Spanish (language identifier)" in spanish.stderr
    bad = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), "--axis", "french", "--measure", "brevity:3",
                                "--screen-only"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--measure is for a custom axis" in bad.stderr and "Traceback" not in bad.stderr


def test_generate_ctrl_c_says_what_was_saved(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    cmd = CLI + ["generate", "-m", str(tiny_model_path), "--limit", "120", "--response-tokens", "48", "--threads", "1", "-o", str(out)]
    # A user's terminal gives the program the default Ctrl-C; a background job (nohup, some CI
    # runners) would hand down an ignored SIGINT instead, and the signal would never arrive.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(_lines(out)) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130  # the shell's code for Ctrl-C
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and str(out) in last and "run the same command again" in last
    recs = [json.loads(line) for line in _lines(out)]
    assert 4 <= len(recs) < 120 and len({r["id"] for r in recs}) == len(recs)


def test_ccs_layers_are_cut_at_the_loss_elbow(tiny_engine: Engine, prefs: Path) -> None:
    from alignez_local.align.directions import ccs_elbow

    prof = fit_profile(tiny_engine, load_pairs(prefs), {"name": "helpful", "positive": "p", "negative": "n"},
                       method="ccs", quiet=True)
    losses = {L: s["ccs_loss"] for L, s in prof.layer_stats.items() if L < tiny_engine.n_layer - 1}
    assert prof.layers == sorted(ccs_elbow(losses))
    assert all(s.shape[0] == 1 for s in prof.subspaces.values())  # one probe direction per layer


def test_model_id_is_name_file_and_hash_never_a_path(tiny_engine: Engine, tiny_model_path: Path) -> None:
    mid = ModelId.of(tiny_engine, str(tiny_model_path))
    assert mid.bundled is None and mid.file == "tiny-llama.gguf" and mid.sha256 == file_sha256(tiny_model_path)
    assert "/" not in json.dumps(mid.as_dict())


@pytest.mark.smollm
def test_model_id_of_a_model_given_by_bundled_name(smollm_engine: Engine) -> None:
    mid = ModelId.of(smollm_engine, "smollm2-135m-instruct")
    assert mid.bundled == "smollm2-135m-instruct" and mid.as_dict()["name"] == "smollm2-135m-instruct"
    assert len(mid.sha256) == 64 and "/" not in json.dumps(mid.as_dict())


def test_describe_and_import(tiny_model_path: Path, profile, tmp_path: Path) -> None:
    model = describe(tiny_model_path)
    assert model["kind"] == "model" and model["arch"] == "llama" and model["n_layer"] == 4 and model["n_embd"] == 64
    save_profile(tmp_path / "p.gguf", profile)
    prof = describe(tmp_path / "p.gguf")
    assert prof["kind"] == "profile" and prof["layers"] == [1, 2, 3] and set(prof["layer_stats"]) == {1, 2, 3}
    src = write_control_vector(tmp_path / "src.gguf", ControlVector({2: np.full(64, 0.5, np.float32)}, model_hint="llama",
                                                                 default_strength=0.25))
    warnings: list[str] = []
    copy = import_vector(src, tmp_path / "copy.gguf", str(tiny_model_path), on_warning=warnings.append)
    assert warnings == [] and copy.default_strength == 0.25
    info = describe(tmp_path / "copy.gguf")
    assert info["kind"] == "control-vector" and info["layers"] == [2] and info["norms"] == {2: 4.0}
    assert info["metadata"]["alignez.source"] == "import:src.gguf"


def test_strength_comes_from_the_spec_then_the_file_then_one(tiny_engine: Engine, profile, tmp_path: Path) -> None:
    plain = write_control_vector(tmp_path / "plain.gguf", ControlVector({2: np.ones(64, np.float32)}, model_hint="llama"))
    calibrated = write_control_vector(tmp_path / "cal.gguf", ControlVector({2: np.ones(64, np.float32)}, model_hint="llama",
                                                                         default_strength=0.5))
    save_profile(tmp_path / "p.gguf", profile)
    st = Steering.from_specs(tiny_engine, [str(plain), f"{calibrated}", f"{calibrated}:-2"],
                             [SteeringSpec(str(tmp_path / "p.gguf"), 0.75), str(tmp_path / "p.gguf")])
    assert [(s.name, s.strength, s.origin) for s in st.slots] == [
        ("plain", 1.0, "default"), ("cal", 0.5, "file default"), ("cal-2", -2.0, "given"),
        ("p", 0.75, "given"), ("p-2", 1.0, "default"),
    ]
    assert "strength 0.5 (file default)" in st.describe()[1] and "strength 0.75 (given)" in st.describe()[3]


def test_calibration_prompts_are_held_out(tiny_engine) -> None:
    from alignez_local.prompt_sets import load_eval_prompts, load_queries
    from alignez_local.prompt_sets import calibration_prompts

    for axis in ("helpful", "harmless"):
        used = load_queries(None, axis=axis)[:96]
        prompts = calibration_prompts(tiny_engine, axis, used)
        assert len(prompts) == 12
        evals = {tiny_engine.prompt(p.text) for p in load_eval_prompts()}
        assert not set(prompts) & ({tiny_engine.prompt(q) for q in used} | evals)


def _as_pirate(prefs: Path, out: Path, talks: int, near_copies: bool = False) -> Path:
    """``prefs`` relabelled as the pirate axis: the first ``talks`` positive answers carry pirate
    words; with ``near_copies`` every negative answer repeats its positive answer."""
    recs = []
    for i, line in enumerate(prefs.read_text().splitlines()):
        r = json.loads(line)
        r["axis"] = {"name": "pirate", "positive": "pirate-talking", "negative": "plain-spoken"}
        pos = ("Arr matey, aye! " if i < talks else "") + r["response"]["positive"]
        # near copies: the same answer twice (one pair differs, so they are not one answer read twice)
        r["response"] = {"positive": pos, "negative": (pos + "." if i == 0 else pos) if near_copies else r["response"]["negative"]}
        recs.append(json.dumps(r))
    out.write_text("\n".join(recs) + "\n")
    return out


def test_the_fit_keeps_the_pairs_the_axis_checker_reads_as_contrasting(tiny_engine: Engine, prefs: Path,
                                                                       tmp_path: Path) -> None:
    pirate = _as_pirate(prefs, tmp_path / "pirate.jsonl", talks=10)
    lines: list[str] = []
    prof = fit_from_file(tiny_engine, pirate, FitSettings(layers=[1, 2]), ModelId.of(tiny_engine),
                                  on_status=lines.append)
    assert any("fitting on the 10 that contrast" in x for x in lines)
    assert prof.params["n_pairs"] == 10
    assert prof.provenance["data_quality"]["behaviour_filter"]["applied"] is True
    every = fit_from_file(tiny_engine, pirate, FitSettings(layers=[1, 2], behaviour_filter=False),
                                   ModelId.of(tiny_engine))
    assert every.params["n_pairs"] == 24


def test_a_model_that_never_shows_the_behaviour_gets_the_reason_not_max_cos(tiny_model_path: Path, prefs: Path,
                                                                              tmp_path: Path) -> None:
    """Two answers that hardly differ and none that shows the behaviour: the error names the cause."""
    pirate = _as_pirate(prefs, tmp_path / "pirate.jsonl", talks=0, near_copies=True)
    out = tmp_path / "p.gguf"
    # Last-token embeddings: the paper's too-similar filter drops near-identical answers (mean pooling keeps them).
    r = subprocess.run([*CLI, "fit", "-m", str(tiny_model_path), "--prefs", str(pirate), "-o", str(out), "--threads", "1",
                        "--pool", "last"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "show the behaviour (answers with >= 2 pirate words" in r.stderr and "0 of 24 pairs" in r.stderr
    assert "--max-cos" not in r.stderr and not out.exists()


def test_mean_pooled_answers_are_not_dropped_as_too_similar(tiny_engine: Engine, prefs: Path) -> None:
    """The paper's too-similar filter is for last-token embeddings: mean-pooled answers all point the
    same way, and the filter dropped every pair of Qwen's helpful data (docs/results.md §17)."""
    from alignez_local.align.fit import PAPER_MAX_COS, too_similar_cos
    pairs = load_pairs(prefs)
    assert too_similar_cos(pairs, "last", None) == PAPER_MAX_COS == 0.8
    assert too_similar_cos(pairs, "mean", None) == 1.0
    assert too_similar_cos(pairs, "mean", 0.5) == 0.5  # a value the user gives is kept
    prof = fit_profile(tiny_engine, pairs, {"name": "helpful", "positive": "p", "negative": "n"}, quiet=True,
                       layers=[1, 2], pool="mean", site="l_out")
    assert prof.params["max_cos"] == 1.0
    assert all(prof.layer_stats[L]["n_dropped"] == 0 for L in (1, 2))
    from alignez_local.errors import AlignezError
    with pytest.raises(AlignezError, match=r"--max-cos 1.5 is out of range"):
        fit_profile(tiny_engine, pairs, {"name": "helpful", "positive": "p", "negative": "n"}, quiet=True,
                    layers=[1], pool="mean", max_cos=1.5)

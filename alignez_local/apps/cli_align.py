"""The AlignEZ commands: generate, fit, export, inspect, import, and steer (all three in one).

Each command turns its flag groups into the library's own settings (``cli_options.grouped``) and
calls the Python API (``api.py``) or the step it wraps; what it prints is the API's status lines
and the result's tables.
"""

from __future__ import annotations

# size: the click commands of the making side (generate, fit, export, import, steer); steer's flags are
# many because its pipeline is, and each command stays thin (it calls api.py).

import dataclasses
import json
import shlex
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import click

from alignez_local import api, pipeline
from alignez_local.align.axes import DEFAULT_AXIS, TRAITS, PreferenceAxis
from alignez_local.align.directions import METHODS
from alignez_local.align.fit import DEFAULT_POOL, POOLS, diagnostics_table
from alignez_local.align.preferences import GenerationSettings, check_pairs_file
from alignez_local.align.recipes import DEFAULT_RECIPE, RECIPES
from alignez_local.align.remote_text import DEFAULT_TIMEOUT as GENERATE_TIMEOUT
from alignez_local.align.remote_text import RemoteWriter
from alignez_local.align.request_contrast import REQUEST_RECIPE
from alignez_local.align.selfcheck import quality_line
from alignez_local.align.strength_by_behaviour import way_name
from alignez_local.align.variants import parse_variants
from alignez_local.align.strength_by_kl import kl_calibrated_vector
from alignez_local.align.vectors import VECTOR_SOURCES, FitSettings, data_quality, export_vector, fit_from_file
from alignez_local.apps.cli_options import grouped, model_options, server_limits, with_flag
from alignez_local.evaluation.behaviour_report import steer_lines
from alignez_local.evaluation.judge import JUDGE_NAMES
from alignez_local.errors import AlignezError
from alignez_local.fileio import check_writable
from alignez_local.formats.control_vector import (
    ADD, EVERY_TOKEN, FORMS, PLACEMENTS, is_placement, placement_words, read_control_vector, write_control_vector,
)
from alignez_local.formats.engines import ENGINES, SOURCES, write_for_engine
from alignez_local.formats.inspect import describe, import_vector
from alignez_local.formats.profile import load_profile, save_profile
from alignez_local.llama.interrupt import Stopped
from alignez_local.measures.behaviour import measure_keys_help
from alignez_local.models import ModelId, resolve_model
from alignez_local.prompt_sets import calibration_prompts, select_queries
from alignez_local.remote_api import base_url
from alignez_local.settings import ModelRun
from alignez_local.specs import FIT_SITES, parse_layer_list, parse_strengths

axis_options = grouped(
    "axis", api.resolve_axis,
    ("axis", click.option("--axis", "axis", default=DEFAULT_AXIS, show_default=True,
                          help="helpful, harmless, humor, or a trait: " + ", ".join(TRAITS) + ".")),
    ("positive", click.option("--positive", default=None, help="Positive persona of a custom axis, e.g. 'pirate-like'.")),
    ("negative", click.option("--negative", default=None, help="Negative persona of a custom axis (with --positive).")),
    ("measure", click.option("--measure", default=None, metavar="KEY",
                             help="How a custom axis's (or a --style's) behaviour is scored: " + measure_keys_help() + ". [a "
                                  "language persona such as 'Spanish': language:CODE; anything else: judge]")),
    ("concept", click.option("--concept", default=None, metavar="SUBJECT",
                             help="A topic to bring into every answer, e.g. 'the ocean' (what a prompt often cannot "
                                  "get): fitted from short texts the model writes about it (--recipe texts).")),
    ("style", click.option("--style", default=None, metavar="STYLE",
                           help="A style to hold in every answer, e.g. 'Shakespearean English', or emoji with --measure "
                                "emoji (--recipe texts).")),
    ("keywords", click.option("--keywords", default=None, metavar="W1,W2,...",
                              help="Words that show a --concept or --style in an answer (whole words, plurals "
                                   "count) [the concept's own words; a style without them or --measure: the judge].")),
)
"""--axis, --positive, --negative, --measure, --concept, --style, --keywords -> ``axis: PreferenceAxis``."""


@dataclass(frozen=True)
class QueryChoice:
    """The generation queries a command was given: a file (None: the built-in set) and a limit."""

    file: str | None = None
    limit: int | None = None

    def select(self, axis: str | None, default_limit: int | None = None) -> list[str]:
        return select_queries(self.file, self.limit or default_limit, axis=axis)


query_options = grouped(
    "queries", QueryChoice,
    ("file", click.option("--queries", "file", default=None, metavar="FILE",
                          help="One query per line, or JSONL with a 'query' field [built-in set of 192].")),
    ("limit", click.option("--limit", type=click.IntRange(1, 100000), default=None, help="Use only the first N queries.")),
)


def _generation(responses: int, response_tokens: int, temperature: float, seed: int) -> GenerationSettings:
    return GenerationSettings(temperature=temperature, response_tokens=response_tokens, responses_per_query=responses, seed=seed)


generation_options = grouped(
    "generation", _generation,
    ("responses", click.option("--responses", type=click.IntRange(1, 16), default=1, show_default=True, help="Pairs per query.")),
    # The library's defaults (GenerationSettings), so a command and the Python API make the same pairs.
    ("response_tokens", click.option("--response-tokens", type=click.IntRange(8, 4096),
                                     default=GenerationSettings.response_tokens, show_default=True)),
    ("temperature", click.option("--temperature", type=click.FloatRange(0, 5), default=GenerationSettings.temperature,
                                 show_default=True)),
    ("seed", click.option("--seed", type=click.IntRange(0, 2**32 - 2), default=GenerationSettings.seed, show_default=True)),
)
"""--responses, --response-tokens, --temperature, --seed -> ``generation: GenerationSettings``."""


def _remote_text(generate_urls: tuple[str, ...], generate_model: str | None, generate_concurrency: int,
                 generate_timeout: float) -> dict[str, Any]:
    for url in generate_urls:
        base_url(url, "--generate-url")  # a bad URL fails now, before the model loads
    return {"generate_urls": generate_urls, "generate_model": generate_model,
            "generate_concurrency": generate_concurrency, "generate_timeout": generate_timeout}


remote_text_options = grouped(
    "remote_text", _remote_text,
    ("generate_urls", click.option(
        "--generate-url", "generate_urls", multiple=True, metavar="URL",
        help="Write the model's text (the pairs; in steer also the screen's and the bench's unsteered and prompting "
             "answers) on an OpenAI-compatible server serving the same GGUF model (llama-server, alignez serve), checked "
             "first; repeat to fan out over several. The capture, fit and steered answers stay local. API key from env "
             "ALIGNEZ_GENERATE_API_KEY, else OPENAI_API_KEY.")),
    ("generate_model", click.option("--generate-model", default=None, metavar="NAME",
                                    help="The model name to ask the --generate-url servers for [the one each lists].")),
    *server_limits("--generate", "Requests", GENERATE_TIMEOUT, "answer"),
)
"""--generate-url, --generate-model, --generate-concurrency, --generate-timeout -> ``remote_text``: api.steer's
keyword arguments of the same names."""


def _writer(remote_text: dict[str, Any]) -> RemoteWriter | None:
    """Return the RemoteWriter the flags ask for (None without --generate-url)."""
    if not remote_text["generate_urls"]:
        return None
    return RemoteWriter(remote_text["generate_urls"], remote_text["generate_model"], remote_text["generate_concurrency"],
                        remote_text["generate_timeout"])


def recipe_option(with_request: bool) -> Any:
    # steer defaults to the request recipe on the harmless axis (the one measured to work there), so
    # its default is decided once the axis is known (api.default_recipe).
    recipes = [*RECIPES, REQUEST_RECIPE] if with_request else list(RECIPES)
    return click.option(
        "--recipe", type=click.Choice(recipes), default=None,
        help="How the model is asked for its two answers (paper: the paper's two-step prompts; texts: short texts "
             "about a --concept or in a --style)"
             + ("; request: no answers, a gated vector from the model's own state on risky vs benign "
                f"requests [request for --axis harmless with its built-in queries, texts for --concept/--style, "
                f"else {DEFAULT_RECIPE}]." if with_request else f" [texts for --concept/--style, else {DEFAULT_RECIPE}]."))


def _fit(method: str, site: str, pool: str | None, layers: str | None, variance: float, max_cos: float | None,
         top_n: int, self_check: bool, behaviour_filter: bool, flip_inverted: bool) -> FitSettings:
    return FitSettings(method=method, site=site, pool=pool, layers=layers, variance=variance, max_cos=max_cos, top_n=top_n,
                       self_check=self_check, behaviour_filter=behaviour_filter, flip=flip_inverted)


fit_options = grouped(
    "fit", _fit,
    ("method", click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
                            help="svd (the paper's subspace), ccs, or the mean / PCA baselines.")),
    ("site", click.option("--site", type=click.Choice(FIT_SITES), default="l_out", show_default=True,
                          help="Residual stream (where control vectors act) or the MLP output (the paper's ffn_out).")),
    ("pool", click.option("--pool", type=click.Choice(POOLS), default=DEFAULT_POOL,
                          help="Embed an answer by its last token (the paper's) or the mean over its tokens "
                               "[mean for --recipe contrast and plain, else last].")),
    ("layers", click.option("--layers", default=None, metavar="A-B|auto", help="Layers to keep [auto: best held-out accuracy].")),
    ("variance", click.option("--variance", type=float, default=0.90, show_default=True, help="Explained variance kept by svd.")),
    ("max_cos", click.option("--max-cos", type=float, default=None,
                             help="Drop pairs whose two embeddings are more similar than this [0.8, the paper's, for "
                                  "--pool last; none dropped for mean pooling, where every two answers point the same way].")),
    ("top_n", click.option("--top-n", type=click.IntRange(1, 1000), default=5, show_default=True,
                           help="Layers the edit picks per prompt.")),
    ("self_check", click.option("--self-check/--no-self-check", "self_check", default=True, show_default=True,
                                help="Fit only on pairs the model's own check agrees with (refusal pairs always leave).")),
    ("behaviour_filter", click.option(
        "--behaviour-filter/--no-behaviour-filter", "behaviour_filter", default=True, show_default=True,
        help="Fit only on pairs whose positive answer shows the behaviour and negative does not, by the axis's "
             "checker (language, brevity, markers...; judge-read axes keep every pair).")),
    ("flip_inverted", click.option("--flip-inverted", is_flag=True,
                                   help="Swap pairs the self-check judged inverted instead of dropping them.")),
)
"""The fit's flags -> ``fit: FitSettings`` (its seed comes from the command's --seed)."""


def _check_layers(fit: FitSettings, n_layer: int) -> None:
    """Raise the flag's own error line for a --layers / --vector-layers the model cannot take."""
    for flag, value in (("--layers", fit.layers), ("--vector-layers", fit.vector_layers)):
        if isinstance(value, str):
            with_flag(flag, parse_layer_list, value, n_layer)


def _interrupted(err: pipeline.Interrupted) -> Stopped:
    # The CLI prints it after "interrupted: " (or "terminated (SIGTERM): ") and exits 130 (143).
    return Stopped(f"{err.saved}; run the same command again to {err.resume}")


def _status(line: str) -> None:
    click.echo(line, err=True)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


@click.command()
@model_options
@axis_options
@query_options
@generation_options
@recipe_option(with_request=False)
@remote_text_options
@click.option("-o", "--out", "out_path", required=True, metavar="FILE.jsonl", help="Preference data (appended; re-runs resume).")
def generate(model: ModelRun, axis: PreferenceAxis, queries: QueryChoice, generation: GenerationSettings,
             recipe: str | None, remote_text: dict[str, Any], out_path: str) -> None:
    """Let the model write its own preference pairs (AlignEZ step 1).

    \b
    alignez generate -o prefs.jsonl --limit 32
    alignez generate -o humor.jsonl --axis humor --queries my_queries.txt
    """
    # As steer chooses, but never the request recipe: it writes no pairs.
    recipe = recipe or api.default_recipe(axis, queries_given=True)
    chosen = queries.select(axis.name)
    out = check_writable(out_path)
    check_pairs_file(out)  # a damaged file fails now, before the model loads
    writer = _writer(remote_text)
    engine = model.open()
    if writer is not None:
        for line in writer.check_model(engine, str(model.model)):
            _status(line)
    try:
        written, had = pipeline.generate(engine, chosen, axis, out, generation, ModelId.of(engine, model.model), recipe=recipe,
                                         writer=writer)
    except pipeline.Interrupted as err:
        raise _interrupted(err) from None
    click.echo(f"{out}: {written} new pairs, {had} already there ({axis.name}: {axis.positive} vs {axis.negative})")
    click.echo(quality_line(data_quality(out, axis.name)))


@click.command()
@model_options
@fit_options
@click.option("--prefs", required=True, metavar="FILE.jsonl", help="Preference data from alignez generate.")
@click.option("--axis", "axis_filter", default=None, help="Axis to fit when the file holds several.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", "out_path", required=True, metavar="PROFILE.gguf")
def fit(model: ModelRun, fit: FitSettings, prefs: str, axis_filter: str | None, seed: int, out_path: str) -> None:
    """Find the preference subspace per layer and write a steering profile (AlignEZ step 2).

    \b
    alignez fit --prefs prefs.jsonl -o helpful.profile.gguf
    alignez fit --prefs prefs.jsonl --method ccs --layers 8-20 -o ccs.profile.gguf
    """
    out = check_writable(out_path)
    engine = model.open()
    _check_layers(fit, engine.n_layer)
    prof = fit_from_file(engine, prefs, dataclasses.replace(fit, seed=seed), ModelId.of(engine, model.model),
                         axis=axis_filter, name=out.name.split(".")[0], on_status=_status)
    save_profile(out, prof)
    click.echo(diagnostics_table(prof))
    click.echo(f"{out}: {prof.method} on {prof.site}, layers {prof.layers}")


@click.command("export")
@model_options
@click.option("--profile", "profile_path", default=None, metavar="PROFILE.gguf",
              help="A profile to turn into a llama.cpp control vector.")
@click.option("--vector", "vector_path", default=None, metavar="VECTOR.gguf",
              help="A control vector to write as another tool's file (with --to).")
@click.option("--to", "engine", type=click.Choice(list(ENGINES)), default=None,
              help="The tool whose file --vector is written as; its layer index and scale (docs/engines.md).")
@click.option("--strength", type=float, default=None,
              help="With --to: the strength folded into the file [the vector's calibrated one].")
@click.option("--fold/--no-fold", default=True, show_default=True,
              help="With --to: multiply the strength into the file (the tool's scale is then 1), or state it.")
@query_options
@click.option("--top-n", type=click.IntRange(1, 1000), default=None, help="Layers per prompt [the profile's].")
@click.option("-o", "--out", "out_path", required=True, metavar="VECTOR.gguf")
def export_cmd(model: ModelRun, profile_path: str | None, vector_path: str | None, engine: str | None,
               strength: float | None, fold: bool, queries: QueryChoice, top_n: int | None, out_path: str) -> None:
    """Turn a profile into a llama.cpp control vector and measure how close it is to the exact edit,
    or write a control vector as another steering tool's file.

    \b
    alignez export --profile helpful.profile.gguf -o helpful.gguf
    llama-completion -m model.gguf --control-vector-scaled helpful.gguf:STRENGTH
    alignez export --vector french.gguf --to repeng -o french.repeng.gguf
    The vector's default strength is calibrated on held-out queries (see alignez inspect).
    """
    if engine is not None or vector_path is not None:
        if engine is None or vector_path is None or profile_path is not None:
            raise AlignezError("export --to takes a control vector: give --vector FILE and --to TOOL, without --profile "
                               "(export a profile to a vector first)")
        done = write_for_engine(read_control_vector(vector_path), engine, out_path, strength, fold, on_warning=_warn)
        click.echo("\n".join(done.lines()))
        return
    if profile_path is None:
        raise AlignezError("export needs --profile FILE (a profile to a llama.cpp vector), or --vector FILE --to TOOL")
    out = check_writable(out_path)
    prof = load_profile(profile_path)
    engine_ = model.open()
    calibration = queries.select(None, pipeline.EXPORT_QUERIES)
    cv, rep = export_vector(engine_, prof, calibration, top_n=top_n, on_warning=_warn)
    axis = str(prof.axis.get("name") or "") or None
    cv = kl_calibrated_vector(engine_, cv, calibration_prompts(engine_, axis, calibration), on_status=_status)
    write_control_vector(out, cv)
    click.echo("\n".join(rep.lines()))
    click.echo(f"{out}: control vector, layers {cv.layers}, calibrated strength {cv.default_strength_or_one:g}")


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Show what a GGUF file is: a control vector (ours, llama.cpp's, repeng's), a profile or a model."""
    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for k, v in info.items():
        if k == "layer_stats":
            click.echo(diagnostics_table(load_profile(path)))
        elif k == "gate" and v:
            click.echo("\n".join(_gate_lines(v)))
        else:
            click.echo(f"{k}: {v}")


def _gate_lines(gate: dict) -> list[str]:
    """Return ``inspect``'s lines for a vector's gates (ControlVector.describe()["gate"])."""
    n = len(gate["gates"])
    head = "one gate" if n == 1 else f"{n} gates, the vector applies when {gate['rule']} of them open{'s' if gate['rule'] == 'any' else ''}"
    lines = [f"gate: {head}; read by alignez-local only (llama.cpp {gate['llama.cpp']})"]
    for i, g in enumerate(gate["gates"], 1):
        lines.append(f"  gate {i}: {g['site']}-{g['layer']} projection {g['comparison']} {g['threshold']:g}")
    return lines


@click.command("import")
@click.argument("path")
@click.option("--from", "source", type=click.Choice(list(SOURCES)), default=None,
              help="The tool that wrote PATH [by its suffix: .gguf llama.cpp, .svec ibm, .safetensors steering-vectors].")
@click.option("-m", "--model", default=None, help="Check the vector fits this model (path or bundled name).")
@click.option("-o", "--out", "out_path", required=True, metavar="VECTOR.gguf")
def import_cmd(path: str, source: str | None, model: str | None, out_path: str) -> None:
    """Check a control vector from another tool (llama.cpp cvector-generator, repeng, EasySteer, IBM
    activation-steering, steering-vectors) and save a clean copy as a llama.cpp control vector.

    The copy keeps the directions exactly, moves the layer keys to llama.cpp's (docs/engines.md),
    divides out a strength alignez export folded in, and records where it came from.
    """
    cv = import_vector(path, out_path, resolve_model(model) if model else None, on_warning=_warn, source=source)
    click.echo(f"{out_path}: {len(cv.layers)} layers {cv.layers[0]}..{cv.layers[-1]}, width {cv.n_embd}, hint {cv.model_hint}")


@click.command()
@model_options
@axis_options
@query_options
@generation_options
@recipe_option(with_request=True)
@fit_options
@remote_text_options
@click.option("--vector-from", type=click.Choice(VECTOR_SOURCES), default="mean-diff", show_default=True,
              help="The control vector: the difference of the pairs' mean states (CAA), or the profile's average edit.")
@click.option("--vector-layers", default=None, metavar="A-B", help="Layers the mean-diff vector steers [the middle third].")
@click.option("--judge", "judge", default="auto", show_default=True, metavar=JUDGE_NAMES,
              help="Judge model for behaviours with no checker (every custom axis); a loaded judge also reads "
                   "relevance, which is otherwise read from the model's own likelihoods. A GGUF path or bundled name; "
                   "auto: the bundled judge only where a measure needs one; none; self: the steered model.")
@click.option("--strengths", default=None, metavar="S1,S2,...",
              help="Strengths to try, as multiples of the vector (the profile's are scaled to match) [0.0625 ... 4].")
@click.option("--screen-only", is_flag=True, help="Only measure whether the model shows the behaviour when asked, then stop.")
@click.option("--calibrate-profile", is_flag=True,
              help="Also choose the profile's (exact edit's) strength by the behaviour, beside its own random null: "
                   "about doubles the calibration stage. Off: profile.gguf is written without a default strength.")
@click.option("--placements", default=EVERY_TOKEN, show_default=True, metavar="P1,P2",
              help="Tokens the vector may be added to: every-token (what llama.cpp does), answer-only (only the "
                   "tokens that write the answer, in alignez's runtime) and/or answer-after:N (the answer's tokens "
                   "after its first N). Given several, the held-out choose queries decide (one more strength search "
                   "each) and the file records the one chosen.")
@click.option("--forms", default=ADD, show_default=True, metavar="F1,F2",
              help="How alignez's runtime applies the vector: add (a constant, what llama.cpp does), clamp (each "
                   "token's component along the direction raised to a target, never past it) and/or keep-norm (added, "
                   "then each token's state scaled back to its own length). Every placement is tried in every form; "
                   "the held-out choose queries decide.")
@click.option("--variants", default=None, metavar="V1,V2",
              help="Other fits of the vector from the same pairs, searched beside it: pool:last or pool:mean (where "
                   "each answer's state is read), layers:A-B (steer only those layers), layers:scan (each layer "
                   "alone on the choose queries, the best one searched: about 46 more trials, 20-25 min on Qwen 0.5B "
                   "with one thread). The held-out choose queries decide; each adds a strength search (pool: also a "
                   "capture).")
@click.option("--system", default=None, metavar="TEXT",
              help="Measure and choose the vector under this system prompt (the unsteered model and the random "
                   "direction too; prompting replaces it with the behaviour's guide), e.g. the one your app uses. "
                   "Default: the chat template's own (Qwen's and SmolLM2's write one naming the model). The pairs "
                   "are written without it; the file's calibration records it.")
@click.option("--keep-work", is_flag=True,
              help="--recipe request: keep all of DIR/request-work after a finished run. Off: its saved states (tens "
                   "of MB) are removed once the vector and report are written; the small files stay.")
@click.option("-o", "--out", "out_dir", default=None, metavar="DIR", help="Output folder [steer-<axis>].")
def steer(model: ModelRun, axis: PreferenceAxis, queries: QueryChoice, generation: GenerationSettings,
          recipe: str | None, fit: FitSettings, remote_text: dict[str, Any], vector_from: str, vector_layers: str | None, judge: str,
          strengths: str | None, screen_only: bool, calibrate_profile: bool, placements: str, forms: str,
          variants: str | None, system: str | None, keep_work: bool, out_dir: str | None) -> None:
    """Generate preference data, fit a profile and a control vector, and choose their strength by the behaviour.

    \b
    alignez steer --axis french        # a trait: answers in French (the trait suite: see --axis)
    alignez steer --positive "sarcastic" --negative "sincere"    # your own behaviour, scored by a judge
    alignez steer --axis harmless      # the request recipe: a gated vector, no answers generated
    alignez steer --axis pirate --screen-only    # does the model talk like a pirate when asked?
    First it screens: how often does the model show the behaviour when simply asked? Then it
    generates pairs, fits, and chooses the vector's strength on held-out queries by the behaviour
    (with relevance and fluency guards), reported on other held-out queries beside the unsteered
    model, prompting and a random direction of the same norm (--calibrate-profile: the profile's too;
    it was weaker than the vector on every trait measured, docs/results.md).
    Writes DIR/preferences.jsonl, DIR/profile.gguf, DIR/vector.gguf and DIR/report.json
    (--recipe request: DIR/vector.gguf, DIR/report.json and its saved work, DIR/request-work/, whose
    saved states are removed when the run finishes unless --keep-work).
    Interrupted? Run the same command again: it continues from the saved pairs (or request-work).
    --generate-url: the text stages on servers serving the same model (checked first).
    """
    recipe = recipe or api.default_recipe(axis, queries.file is not None)
    folder = out_dir or f"steer-{axis.name}"
    if recipe == REQUEST_RECIPE:
        if remote_text["generate_urls"]:
            raise AlignezError("--generate-url writes pairs and answers; the request recipe (--axis harmless) reads the "
                               "model's states and writes no pairs: run it without --generate-url")
        if variants:
            raise AlignezError("--variants are other fits of a vector from pairs; the request recipe (--axis harmless) "
                               "fits from the model's states and writes no pairs: run it without --variants")
        if system is not None:
            raise AlignezError("--system is the system prompt a behaviour is measured under; the request recipe (--axis "
                               "harmless) counts refusals of requests as sent: run it without --system")
        _steer_refusals(model, axis, queries, generation.seed, folder, keep_work)
        return
    if keep_work:
        raise AlignezError(f"--keep-work keeps the request recipe's saved work (--axis harmless); the {recipe} recipe keeps "
                           f"its pairs in {folder}/preferences.jsonl anyway: run it without --keep-work")
    if system is not None and not system.strip():
        raise AlignezError("--system is empty; give the system prompt's text, or leave --system out for the chat "
                           "template's own")
    grid = parse_strengths(strengths, "--strengths", positive=True, limit=1e4) if strengths else None
    places = _listed(placements, PLACEMENTS, "--placements", "placement", is_placement,
                     ", answer-after:N (N answer tokens written unsteered first)")
    how = _listed(forms, FORMS, "--forms", "form")
    others = parse_variants(variants)
    # Checked before any work, so a bad folder fails at once; --screen-only writes nothing.
    if not screen_only:
        with_flag("--out", pipeline.SteerPaths.prepare, folder)
    chosen = queries.select(axis.name, pipeline.STEER_QUERIES)
    engine = model.open()
    fit = dataclasses.replace(fit, seed=generation.seed, vector_from=vector_from, vector_layers=vector_layers)
    _check_layers(fit, engine.n_layer)
    try:
        res = api.steer(engine, axis, name=str(model.model), queries=chosen,
                        out=folder, generation=generation, fit=fit, recipe=recipe, strengths=grid,
                        calibrate_profile=calibrate_profile, judge=judge, screen_only=screen_only, on_status=_status,
                        placements=places, forms=how, variants=others, system=system, **remote_text)
    except pipeline.Interrupted as err:
        raise _interrupted(err) from None
    except KeyboardInterrupt:
        raise Stopped("nothing was written (the stop came while screening); run the same command again") from None
    if res is None:
        return
    click.echo(diagnostics_table(res.profile))
    if res.approximation is not None:
        click.echo("\n".join(res.approximation.lines()))
    click.echo("\n".join(steer_lines(res.calibration)))
    p = res.paths
    click.echo(f"profile: {p.profile}\nvector:  {p.vector}\nreport:  {p.report}\ntook {res.timings['total_s']:.0f}s")
    cal = res.calibration["vector"]
    # The figures hold under the system prompt they were measured under: give it to chat too.
    under = f" --system {shlex.quote(cal.system)}" if cal.system is not None else ""
    click.echo(f"try it:  alignez chat -m {model.model} --vector {p.vector}{under}")
    scale = res.vector.default_strength_or_one
    # The file holds the chosen variant's vector: what llama.cpp can do with it is that variant's
    # every-token addition.
    way, plain_way = way_name(cal.placement, cal.form, cal.variant), way_name(EVERY_TOKEN, ADD, cal.variant)
    every = cal.placements.get("tried", {}).get(plain_way)
    if way != plain_way and every is not None:
        # llama.cpp adds the vector as a constant at every token: give it the strength that way was best at.
        click.echo(f"         llama-completion -m {engine.path} --control-vector-scaled {p.vector}:{every['strength']:g}")
        click.echo(f"         (llama.cpp adds it as a constant at every token, which scored combined {every['combined']:.2f} on "
                   f"the choose queries against {way}'s {cal.placements['tried'][way]['combined']:.2f})")
    elif cal.form == ADD:
        click.echo(f"         llama-completion -m {engine.path} --control-vector-scaled {p.vector}:{scale:g}")
        if cal.placement != EVERY_TOKEN:
            click.echo(f"         (llama.cpp adds it at every token, not to {placement_words(cal.placement)}; this run "
                       "did not measure that: add every-token to --placements)")
    else:
        # A clamp's or keep-norm's strengths do not carry over to a constant addition (brief: clamp x2 is
        # fluent, add x1 breaks).
        click.echo(f"         (llama.cpp cannot apply {way}: it adds the vector as a constant at every token, for which "
                   "this run chose no strength; add it to --forms and --placements to measure one)")


def _listed(text: str, known: tuple[str, ...], flag: str, what: str,
            ok: Callable[[str], bool] | None = None, more: str = "") -> tuple[str, ...]:
    """Return a comma-separated choice of ``known`` values (or of values ``ok`` accepts, which
    ``more`` names for the error line), in order, once each (one error line otherwise)."""
    picked = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    wrong = [v for v in picked if not (ok(v) if ok else v in known)] or ([] if picked else [text])
    if wrong:
        raise AlignezError(f"{flag}: unknown {what} {wrong[0]!r}; use {', '.join(known[:-1])}, {known[-1]}{more} "
                           "or several, comma-separated")
    return picked


def _steer_refusals(model: ModelRun, axis: PreferenceAxis, queries: QueryChoice, seed: int, folder: str,
                    keep_work: bool) -> None:
    """``steer --recipe request``: the gated vector (align/request_contrast.py)."""
    engine = model.open()
    try:
        res = api.steer_refusals(engine, folder, axis, queries.file, seed, on_status=_status, name=str(model.model),
                                 keep_work=keep_work)
    except pipeline.Interrupted as err:
        raise _interrupted(err) from None
    except KeyboardInterrupt:
        raise Stopped("nothing was written (the stop came before any work); run the same command again") from None
    scale = res.vector.default_strength_or_one
    click.echo(f"vector:  {res.vector_path} (layer {res.contrast.layer}, gated)\nreport:  {res.report_path}\n"
               f"took {res.timings['total_s']:.0f}s")
    click.echo(f"try it:  alignez chat -m {model.model} --vector {res.vector_path}")
    click.echo(f"         llama-completion -m {engine.path} --control-vector-scaled {res.vector_path}:{scale:g}")
    click.echo("         (llama.cpp ignores the gates: there the vector steers every prompt, benign ones too)")


align_commands = [generate, fit, export_cmd, inspect, import_cmd, steer]

"""The Python API: what a notebook user reaches for, and what the ``alignez`` commands call.

    import alignez_local as az

    engine = az.load("qwen2.5-coder-0.5b-instruct")
    result = az.steer(engine, axis="french")              # the model writes its own pairs; files optional
    vector = az.train(engine, [("Name a fruit.", "Une pomme.", "An apple.")])   # your own pairs
    with result.vector.apply(engine):                     # llama.cpp's own control vector, calibrated strength
        print(az.generate(engine, "What is the capital of Peru?"))
    table = az.evaluate(engine, result.vector, axis="french")   # behaviour beside prompting and a random direction

Every function takes an open ``Engine`` (``load``) or a model name / GGUF path, which it opens and
closes itself. Work that takes minutes prints progress bars on stderr; ``on_status`` receives the
lines ``alignez steer`` prints.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from alignez_local.align.axes import DEFAULT_AXIS, PreferenceAxis, custom_axis, get_axis, style_axis, topic_axis
from alignez_local.align.preferences import GenerationSettings, PreferencePair
from alignez_local.align.recipes import DEFAULT_RECIPE, get_recipe
from alignez_local.align.remote_text import DEFAULT_TIMEOUT as GENERATE_TIMEOUT
from alignez_local.align.remote_text import RemoteWriter
from alignez_local.align.request_contrast import REQUEST_RECIPE
from alignez_local.align.steering import Steering
from alignez_local.align.strength_by_behaviour import STRENGTHS
from alignez_local.align.variants import parse_variants
from alignez_local.align.vectors import FitSettings, train_vector
from alignez_local.errors import AlignezError
from alignez_local.evaluation.behaviour_eval import axis_of, behaviour_judge, measure_behaviour, prompt_kind
from alignez_local.formats.control_vector import ADD, EVERY_TOKEN, ControlVector
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.llama.rpc import parse_endpoints
from alignez_local.models import DEFAULT_MODEL, ModelId
from alignez_local.pipeline import (
    STEER_QUERIES, RequestSteerResult, SteerPaths, SteerPlan, SteerResult, behaviour_bench, run_request_steer, run_steer,
    screen,
)
from alignez_local.progress import Notify, StageClock, quiet
from alignez_local.remote_api import DEFAULT_CONCURRENCY
from alignez_local.prompt_sets import load_eval_prompts, select_queries
from alignez_local.settings import ModelRun, RuntimeSettings

ModelLike = Engine | ModelRun | str | Path

def load(model: str | Path = DEFAULT_MODEL, threads: int | None = None, n_ctx: int = 4096, parallel: int = 8,
         gpu_layers: int = 0, rpc: str | Sequence[str] = ()) -> Engine:
    """Return an engine on ``model`` (a GGUF path or a bundled name). Close it when done, or use
    it in a ``with`` block. ``rpc``: llama.cpp rpc-server endpoints ("HOST:PORT,...") to run the
    layers on (needs an RPC build of llama.cpp: scripts/build_rpc.sh)."""
    servers = parse_endpoints(rpc) if rpc else ()
    return ModelRun(model, RuntimeSettings(threads=threads, n_ctx=n_ctx, parallel=parallel, gpu_layers=gpu_layers,
                                           rpc=servers)).open()


@contextmanager
def _engine(model: ModelLike) -> Iterator[Engine]:
    """Yield ``model`` when it is an engine, else one opened on it and closed after."""
    if isinstance(model, Engine):
        yield model
        return
    run = model if isinstance(model, ModelRun) else ModelRun(model)
    with run.open() as engine:
        yield engine


def queries(axis: str | None = None, limit: int | None = None, file: str | Path | None = None) -> list[str]:
    """Return generation queries: the built-in set of ``axis`` (None: the general set) or a file
    (one per line, or JSONL with a "query" field), the first ``limit`` of them."""
    return select_queries(str(file) if file is not None else None, limit, axis=axis)


def resolve_axis(axis: str | PreferenceAxis = DEFAULT_AXIS, positive: str | None = None, negative: str | None = None,
                 measure: str | None = None, concept: str | None = None, style: str | None = None,
                 keywords: str | None = None) -> PreferenceAxis:
    """Return a built-in axis by name, or a custom one when ``positive``/``negative`` are given
    (``measure``: how a custom axis is scored, e.g. ``language:es``; None: chosen from the personas),
    or a topic (``concept``) or style (``style``) axis, read by ``keywords`` ("ocean,sea,waves")."""
    if isinstance(axis, PreferenceAxis):
        return axis
    given = [flag for flag, v in (("--positive/--negative", (positive, negative) != (None, None)),
                                  ("--concept", concept is not None), ("--style", style is not None)) if v]
    if len(given) > 1:
        raise AlignezError(f"{' and '.join(given)} each name a behaviour; give one of them")
    named = None if axis == DEFAULT_AXIS else axis
    if concept is not None or style is not None:
        if measure is not None and (concept is not None or keywords is not None):
            raise AlignezError("a --concept is measured by its --keywords, a --style by its --keywords or a --measure "
                               "(e.g. --style emoji --measure emoji); give one of them")
        if concept is not None:
            return topic_axis(concept, keywords, named)
        return style_axis(str(style), keywords, named, measure=measure)
    if keywords is not None:
        raise AlignezError("--keywords is for --concept or --style; a custom axis takes --measure mentions:WORD,...")
    if positive is not None or negative is not None:
        if positive is None or negative is None:
            raise AlignezError("a custom axis needs both --positive and --negative personas")
        return custom_axis(positive, negative, named, measure=measure)
    found = get_axis(axis)
    if measure is not None:
        # A built-in axis's measure is part of what its results mean; a different one is another axis.
        raise AlignezError(f"--measure is for a custom axis (--positive/--negative); the {found.name} axis is "
                           f"measured by {found.measure or 'the judge'}")
    return found


def default_recipe(axis: str | PreferenceAxis, queries_given: bool) -> str:
    """Return steer's recipe when none is given: ``request`` on the harmless axis with its built-in
    queries (the persona recipes moved no refusals there: docs/journal/2026-11-28-to-12-03.md §1;
    the request recipe's gated vector did, §8), ``texts`` for a topic or style axis (its pairs are
    texts about the concept, not answers to a persona), else the default persona recipe. A user's
    queries may lack the risky/benign kinds the request recipe needs, so they keep the persona default."""
    if isinstance(axis, PreferenceAxis) and axis.from_texts:
        return "texts"
    name = axis.name if isinstance(axis, PreferenceAxis) else axis
    return REQUEST_RECIPE if name == "harmless" and not queries_given else DEFAULT_RECIPE


def steer(model: ModelLike, axis: str | PreferenceAxis = DEFAULT_AXIS, *, positive: str | None = None,
          negative: str | None = None, measure: str | None = None, concept: str | None = None,
          style: str | None = None, keywords: str | None = None, queries: Sequence[str] | None = None,
          out: str | Path | None = None, generation: GenerationSettings = GenerationSettings(),
          fit: FitSettings = FitSettings(), recipe: str | None = None, strengths: Sequence[float] | None = None,
          calibrate_profile: bool = False, judge: str = "auto", screen_only: bool = False,
          on_status: Notify | None = None, name: str | None = None,
          placements: Sequence[str] = (EVERY_TOKEN,), forms: Sequence[str] = (ADD,),
          variants: str | Sequence[str] = (), generate_urls: Sequence[str] = (),
          generate_model: str | None = None, generate_concurrency: int = DEFAULT_CONCURRENCY,
          generate_timeout: float = GENERATE_TIMEOUT, system: str | None = None) -> SteerResult | None:
    """Make a control vector and a profile for a behaviour, and choose their strength by it:
    ``alignez steer``.

    The model is screened (does it show the behaviour when asked?), writes its own pairs for
    ``queries`` (None: the axis's first ``pipeline.STEER_QUERIES`` built-in ones, 24), the pairs are fitted, and the vector's
    strength is chosen on 8 held-out queries by the behaviour (with relevance and fluency guards)
    and reported on 16 others beside the unsteered model, prompting and a random direction of the
    same norm. ``out``: the folder the files go to (preferences.jsonl, profile.gguf, vector.gguf,
    report.json; a re-run continues from its saved pairs); None keeps them only in the result.
    ``screen_only``: stop after the screen and return None. ``name``: what the model is called in
    the output and the files' provenance when ``model`` is an engine (a bundled name is recorded as
    such). ``concept`` / ``style`` (with ``keywords``): a topic or style axis (``resolve_axis``),
    fitted from the model's short texts (the ``texts`` recipe). The gated refusal vector (``recipe="request"``) is ``steer_refusals``.
    ``placements``: the tokens the vector may be added to (``every-token``: what llama.cpp does;
    ``answer-only``: only the rows that write the answer, in alignez's runtime; ``answer-after:N``: those
    rows after the answer's first N tokens); given several, the
    choose half decides among them and the file records the one chosen (each adds a strength search).
    ``forms``: how alignez's runtime applies it (``add``: a constant, what llama.cpp does; ``clamp``:
    each row's component along the direction raised to a target, never past it; ``keep-norm``: added,
    then each row scaled back to its own length); several: likewise. ``variants``: other fits of the
    vector from the same pairs (``"pool:last,layers:12"``, or ``"layers:scan"``: the best single layer
    on the choose queries, align/layer_scan.py; align/variants.py), searched in every placement
    and form beside it; the file holds the one chosen.
    ``generate_urls``: OpenAI-compatible servers serving the same model (llama-server, ``alignez
    serve``) write the text stages: the screen, the pairs and the unsteered and prompting answers
    (``generate_model``: the name to ask for, None: the one each server lists; ``generate_concurrency``
    requests in flight per server); each server is checked to serve this model first. The capture,
    the fit and every steered answer stay local (align/remote_text.py).
    ``system``: the system prompt the vector is measured and chosen under (the unsteered model, the
    random direction and the screen's unsteered answers too; prompting replaces it with the
    behaviour's guide); None: the chat template's own. The pairs are written without it.
    """
    status = on_status or quiet
    writer = (RemoteWriter(generate_urls, generate_model, generate_concurrency, generate_timeout)
              if generate_urls else None)  # checked now (URLs, httpx); nothing is sent before the engine is open
    chosen = resolve_axis(axis, positive, negative, measure, concept, style, keywords)
    recipe = recipe or default_recipe(chosen, queries is not None)
    if recipe == REQUEST_RECIPE:
        raise AlignezError("the request recipe makes a gated vector with no pairs: use steer_refusals "
                           "(alignez steer --axis harmless)")
    grid = tuple(strengths) if strengths else STRENGTHS
    plan = SteerPlan(chosen, tuple(queries) if queries is not None else tuple(select_queries(None, STEER_QUERIES, chosen.name)),
                     generation, fit, recipe, grid, refine=not strengths, with_profile=calibrate_profile,
                     placements=tuple(placements), forms=tuple(forms), variants=parse_variants(variants),
                     system=system)
    with ExitStack() as stack:
        folder, used = None, list(plan.queries)
        if not screen_only:
            where = out if out is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="alignez-steer-"))
            paths = SteerPaths.prepare(where)
            # Queries fitted on (those of pairs already in the folder too) are never held out.
            folder, used = paths.folder, paths.fitted_queries(plan.queries)
        with _engine(model) as engine:
            if writer is not None:
                for line in writer.check_model(engine, _display_name(model, engine, name)):
                    status(line)
            with behaviour_judge(judge, engine, chosen) as the_judge:
                clock = StageClock(engine, getattr(the_judge, "engine", None))
                bench = behaviour_bench(engine, chosen, used, the_judge, writer=writer, base=system)
                line, _, _ = screen(bench, _display_name(model, engine, name), get_recipe(recipe).texts)
                clock.lap("screen_s")
                status(line)
                if folder is None:
                    return None
                return run_steer(engine, plan, folder, ModelId.of(engine, _given_name(model, name)), status, bench, clock=clock,
                                 writer=writer)


def steer_refusals(model: ModelLike, out: str | Path, axis: str | PreferenceAxis = "harmless", queries_file: str | None = None,
                   seed: int = 0, on_status: Notify | None = None, name: str | None = None,
                   keep_work: bool = False) -> RequestSteerResult:
    """Make the gated refusal vector (``alignez steer --axis harmless``): the model's own refused-minus-
    complied state on risky requests, behind a gate that reads each prompt, its strength chosen by
    refusals of held-out requests within an over-refusal budget. Writes OUT/vector.gguf and report.json,
    keeping its work in OUT/request-work as it goes: interrupted, the same call continues it. Finished,
    it removes the saved states (the bulk of that work) unless ``keep_work``."""
    with _engine(model) as engine:
        return run_request_steer(engine, resolve_axis(axis), out, ModelId.of(engine, _given_name(model, name)), queries_file, seed,
                                 on_status=on_status or quiet, keep_work=keep_work)


def train(engine: Engine, pairs: Sequence[tuple[str, str, str] | PreferencePair], *, layers: Sequence[int] | None = None,
          name: str = "vector", pool: str = "mean") -> ControlVector:
    """Return the difference-of-means control vector of your own pairs, each (query, an answer that
    shows the behaviour, one that does not), on the middle third of the layers (or ``layers``). The
    vector has no calibrated strength: try a few with ``vector.apply(engine, strength)``, or measure
    them with ``evaluate``."""
    prefs = [p if isinstance(p, PreferencePair) else PreferencePair(str(i), p[0], name, p[1], p[2], recipe="plain")
             for i, p in enumerate(pairs)]
    return train_vector(engine, prefs, layers, name, pool)


def generate(engine: Engine, prompts: str | Sequence[str], vector: ControlVector | None = None,
             strength: float | None = None, system: str | None = None, max_tokens: int = 128,
             sampling: Sampling | None = None) -> str | list[str]:
    """Return the model's answer to a user message (a list of answers for a list), steered by
    ``vector`` at ``strength`` (None: its calibrated strength, else 1) when given. Gated vectors
    steer only the prompts their gates open on; the others get exactly the unsteered answers of the
    shut prompts decoded together (``Steering.generate``). Greedy unless ``sampling`` says otherwise."""
    sampling = sampling or Sampling(temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.1)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    formatted = [engine.prompt(t, system) for t in texts]
    if vector is None:
        done = engine.generate(formatted, sampling)
    else:
        s = vector.default_strength_or_one if strength is None else float(strength)
        done = Steering.vector(vector, s).generate(engine, formatted, sampling)
    answers = [c.text for c in done]
    return answers[0] if isinstance(prompts, str) else answers


def evaluate(engine: Engine, vector: ControlVector, axis: str | PreferenceAxis | None = None,
             strength: float | None = None, questions: Sequence[str] | None = None, judge: str = "auto",
             max_tokens: int = 64, seed: int = 0) -> dict[str, Any]:
    """Return the behaviour table of ``vector`` (``alignez eval --behaviour``): on ``questions``
    (None: the built-in ordinary evaluation prompts, harmful ones for a refusal axis), the behaviour
    rate with its 95% interval, relevance, fluency and the combined score for the unsteered model,
    prompting (the positive persona as system prompt), a random direction of the same norm at the
    same strength, and the vector. ``axis`` None: the one the vector was made for."""
    s = vector.default_strength_or_one if strength is None else float(strength)
    steering = Steering.vector(vector, s)
    chosen = resolve_axis(axis) if axis is not None else axis_of(steering)
    if chosen is None:
        raise AlignezError(f"vector {vector.name} does not say which behaviour it steers; give axis=...")
    if questions is None:
        questions = [p.text for p in load_eval_prompts(kinds={prompt_kind(chosen)})]
    with behaviour_judge(judge, engine, chosen) as the_judge:
        return measure_behaviour(engine, steering, chosen, list(questions), the_judge,
                                 Sampling(temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.1, seed=seed), seed)


def _given_name(model: ModelLike, name: str | None = None) -> str | Path | None:
    """Return what the user named the model with (a bundled name is recorded as such): ``name`` for
    an engine, None when there is none."""
    if isinstance(model, Engine):
        return name
    return model.model if isinstance(model, ModelRun) else model


def _display_name(model: ModelLike, engine: Engine, name: str | None = None) -> str:
    given = _given_name(model, name)
    return str(given) if given is not None else engine.name

"""Step 2 of AlignEZ: read the model's hidden states on the preference pairs and find, per layer,
the preference subspace; keep the layers that separate the pairs best.

Embedding choice (ours, documented): the text embedded for a pair side is the prompt the model
sees at inference (its chat template around the query, or the plain base-model format) followed by
the response. The paper embeds ``query + " " + response``; using the inference-time format keeps the
subspace in the same activation distribution the edit later acts on. The conditioning instruction
(persona, characteristics) is never part of the embedded text, except for the ``contrast`` recipe,
whose two sides are one answer read under each persona's system prompt (``PreferencePair.contexts``):
there the persona is the whole contrast.

Pooling (``POOLS``): ``last``, the activation at the last token of the response (the paper's), or
``mean``, the mean over the response's tokens. One token of a 135M model's answer carries little
of what the whole answer is like; see docs/method.md for the measurement that chose the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from alignez_local.version import __version__
from alignez_local.align.directions import METHODS, LayerFit, ccs_elbow, fit_layer, select_layers
from alignez_local.llama.engine import Engine
from alignez_local.errors import AlignezError
from alignez_local.align.preferences import PreferencePair, data_sha256
from alignez_local.formats.profile import SteeringProfile
from alignez_local.progress import Progress
from alignez_local.specs import FIT_SITES

POOLS = ("last", "mean")
DEFAULT_POOL: str | None = None
"""None: ``default_pool`` chooses by the pairs. Mean-pooled embeddings of two different answers
share most of their direction (every pair of the shipped SmolLM2 data had cos > 0.8 at layer 8), so
the paper's too-similar filter is not applied to them (``too_similar_cos``)."""


PAPER_MAX_COS = 0.8
"""The paper's too-similar threshold (method.md §1.4), for last-token embeddings of two answers."""


def too_similar_cos(pairs: Sequence[PreferencePair], pool: str, max_cos: float | None) -> float:
    """Return the cosine above which a pair is dropped as too similar: ``max_cos`` when given, else
    the paper's 0.8 for two answers embedded by their last token, and 1.0 (no pair dropped) otherwise.

    One answer read under two personas has two embeddings of the same tokens, near-parallel by
    construction, and the persona's small shift between them is the whole signal. The mean over an
    answer's tokens shares the residual stream's large common component: two different answers to
    one question point the same way whatever they say (Qwen2.5-Coder-0.5B, plain recipe: its helpful
    and misleading answers kept 1 of 59 pairs at layer 1 and none could be fitted; even French against
    English kept 16 of 58 at layer 12). The filter, written for last-token embeddings, would drop the
    pairs that carry the behaviour, and a pair of near-identical answers adds a near-zero difference,
    which neither the mean nor the SVD of the differences is hurt by."""
    if one_answer_pairs(pairs):
        return 1.0
    if max_cos is not None:
        return max_cos
    return PAPER_MAX_COS if pool == "last" else 1.0


def one_answer_pairs(pairs: Sequence[PreferencePair]) -> bool:
    """True when every pair is one answer read twice (the ``contrast`` recipe)."""
    return bool(pairs) and all(p.positive == p.negative for p in pairs)


def default_pool(pairs: Sequence[PreferencePair]) -> str:
    """Return the pool used when none is given (``DEFAULT_POOL``): the mean over the answer's tokens
    for one answer read twice (``contrast``) and for the ``plain`` recipe (the behaviour is in every
    token of the answer: measured on Qwen 0.5B, docs/results.md §10), else the paper's last token."""
    return "mean" if one_answer_pairs(pairs) or all(p.recipe == "plain" for p in pairs) else "last"


def pair_texts(engine: Engine, pairs: Sequence[PreferencePair]) -> tuple[list[str], list[str], list[int], list[int]]:
    """Return the texts embedded for the positive and the negative side of every pair, and the token
    index where each side's response starts (for ``mean`` pooling)."""
    pos: list[str] = []
    neg: list[str] = []
    starts: tuple[list[int], list[int]] = ([], [])
    sep = "" if engine.is_chat else " "
    for p in pairs:
        for i, (out, answer) in enumerate(((pos, p.positive), (neg, p.negative))):
            prompt = engine.prompt(p.query, system=p.contexts[i] or None)
            out.append(prompt + sep + answer)
            starts[i].append(len(engine.tokenize(prompt + sep)))
    return pos, neg, starts[0], starts[1]


def capture_layers(n_layer: int, named: Sequence[int] = ()) -> list[int]:
    """Return the layers a fit reads: every layer but the last, unless a layer list the user gave
    (``named``) holds it or the model has only two.

    The automatic choice never takes the last layer (``select_layers``), and reading it costs more
    than any other: llama.cpp computes a layer's last rows only for output tokens, so a mean over
    the answer at the last layer marks every answer token as an output, and the model then also
    computes the logits of every one of them (151,936 of them per token on Qwen2.5).
    """
    last = n_layer - 1
    return list(range(n_layer)) if n_layer <= 2 or last in named else list(range(last))


def capture_pairs(engine: Engine, pairs: Sequence[PreferencePair], site: str, pool: str | None = DEFAULT_POOL,
                  quiet: bool = False, layers: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (pos, neg) activations, each (pairs x captured layers x n_embd), pooled by ``pool``;
    ``layers`` (a prefix of the model's, default ``capture_layers``) are the layers read."""
    layers = list(layers) if layers is not None else capture_layers(engine.n_layer)
    if layers != list(range(len(layers))):
        raise ValueError("capture_pairs reads a prefix of the layers, 0 .. k-1")
    pool = pool or default_pool(pairs)
    if pool not in POOLS:
        raise AlignezError(f"unknown pool {pool!r}; use last (the response's last token) or mean (all its tokens)")
    pos_t, neg_t, pos_s, neg_s = pair_texts(engine, pairs)
    bar = Progress(len(pos_t) + len(neg_t), "capture", quiet=quiet)
    # One side at a time: each side's texts share its system prompt (the persona guide of a
    # contrast pair, or the chat template's default), which the engine then decodes only once.
    acts = [engine.capture(texts, layers, site=site, reduce=pool,
                           mean_from=starts if pool == "mean" else None, on_progress=lambda d, t: bar.update())
            for texts, starts in ((pos_t, pos_s), (neg_t, neg_s))]
    bar.close()
    return acts[0], acts[1]


def fit_profile(
    engine: Engine,
    pairs: Sequence[PreferencePair],
    axis: dict[str, str],
    *,
    method: str = "svd",
    site: str = "ffn_out",
    pool: str | None = DEFAULT_POOL,
    layers: list[int] | None = None,
    max_layers: int | None = None,
    variance: float = 0.90,
    max_cos: float | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    top_n: int = 5,
    model_sha256: str = "",
    model_bundled: str | None = None,
    name: str = "profile",
    quiet: bool = False,
    captured: tuple[np.ndarray, np.ndarray] | None = None,
) -> SteeringProfile:
    """Return a steering profile fitted on ``pairs``: subspaces for the chosen layers and diagnostics for all.

    The provenance names the model by its file name, SHA-256 and (when it was given by name) its
    bundled name ``model_bundled``; never by a local path. ``captured``: the (pos, neg) activations
    of every layer, already read by ``capture_pairs`` with the same site and pool.
    """
    _check_args(method, site, variance, 1.0 if max_cos is None else max_cos, len(pairs))  # a bad value given fails
    pool = pool or default_pool(pairs)
    max_cos = too_similar_cos(pairs, pool, max_cos)
    if captured is None:
        captured = capture_pairs(engine, pairs, site, pool=pool, quiet=quiet,
                                 layers=capture_layers(engine.n_layer, layers or ()))
    pos, neg = captured
    fits = _fit_layers(pos, neg, method=method, variance=variance, max_cos=max_cos, holdout=holdout, seed=seed)
    chosen = layers if layers is not None else _auto_layers(fits, engine.n_layer, method, max_layers)
    missing = [x for x in chosen if x not in fits]
    if missing:
        raise AlignezError(f"layers {missing} had too few usable pairs to fit; choose other --layers")
    stats = {L: _stats(f, L in chosen) for L, f in fits.items()}
    return SteeringProfile(
        subspaces={L: fits[L].directions for L in chosen},
        site=site,
        method=method,
        axis=dict(axis),
        layer_stats=stats,
        params={"pool": pool, "variance": variance, "max_cos": max_cos, "holdout": holdout, "seed": seed, "top_n": top_n,
                "layer_choice": "manual" if layers is not None else "auto", "n_pairs": len(pairs)},
        provenance={
            "model_name": engine.name, "model_file": engine.path.name, "model_sha256": model_sha256,
            **({"model_bundled": model_bundled} if model_bundled else {}),
            "arch": engine.arch, "n_layer": engine.n_layer, "n_embd": engine.n_embd,
            "data_sha256": data_sha256(pairs), "package_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        name=name,
    )


def _check_args(method: str, site: str, variance: float, max_cos: float, n_pairs: int) -> None:
    if method not in METHODS:
        raise AlignezError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if site not in FIT_SITES:
        raise AlignezError(f"unknown site {site!r}; use ffn_out (the paper's MLP output) or l_out")
    if not 0.0 < variance <= 1.0:
        raise AlignezError(f"--variance {variance} is out of range; use a fraction in (0, 1]")
    if not 0.0 < max_cos <= 1.0:
        raise AlignezError(f"--max-cos {max_cos} is out of range; use a value in (0, 1]")
    if n_pairs < 4:
        raise AlignezError(f"only {n_pairs} preference pairs; fitting needs at least 4 (generate more queries)")


def _fit_layers(pos: np.ndarray, neg: np.ndarray, **fit_args: Any) -> dict[int, LayerFit]:
    """Return the fit of every layer that has enough usable pairs (pos/neg: pairs x n_layer x n_embd)."""
    fits: dict[int, LayerFit] = {}
    skipped: dict[int, str] = {}
    for layer in range(1, pos.shape[1]):  # layer 0 has no control-vector slot in llama.cpp
        try:
            fits[layer] = fit_layer(layer, pos[:, layer], neg[:, layer], **fit_args)
        except AlignezError as err:
            skipped[layer] = str(err)
    if not fits:
        raise AlignezError(f"no layer had enough usable pairs ({next(iter(skipped.values()))})")
    return fits


def _auto_layers(fits: dict[int, LayerFit], n_layer: int, method: str, max_layers: int | None) -> list[int]:
    """Return the automatically chosen layers: for ``ccs``, the paper's cut at the elbow of the
    sorted CCS losses (never the last layer, at most ``max_layers``); otherwise by held-out accuracy."""
    if method == "ccs":
        losses = {L: f.ccs_loss for L, f in fits.items() if f.ccs_loss is not None and L < n_layer - 1}
        ranked = ccs_elbow(losses)  # best first
        if ranked:
            return sorted(ranked[: max_layers or max(5, n_layer // 3)])
    return select_layers(fits, n_layer, max_layers=max_layers)


def _stats(f: LayerFit, chosen: bool) -> dict[str, Any]:
    return {
        "heldout_accuracy": float(f.heldout_accuracy),
        "train_accuracy": float(f.train_accuracy),
        "explained": float(np.sum(f.explained)),
        "k": int(f.directions.shape[0]),
        "n_pairs": int(f.n_pairs),
        "n_dropped": int(f.n_dropped),
        "chosen": 1.0 if chosen else 0.0,
        **({"ccs_loss": float(f.ccs_loss)} if f.ccs_loss is not None else {}),
    }


def diagnostics_table(profile: SteeringProfile) -> str:
    """Return a plain-text table of the per-layer diagnostics."""
    rows = ["layer  chosen  heldout_acc  train_acc  k    explained  pairs(dropped)"]
    for L in sorted(profile.layer_stats):
        s = profile.layer_stats[L]
        rows.append(
            f"{L:>5}  {'*' if s.get('chosen') else ' ':^6}  {s['heldout_accuracy']:>11.2f}  {s['train_accuracy']:>9.2f}  "
            f"{int(s['k']):<3}  {s['explained']:>9.2f}  {int(s['n_pairs'])}({int(s['n_dropped'])})"
        )
    return "\n".join(rows)

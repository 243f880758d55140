"""A default strength that is measured, not guessed.

A steering file is only useful at a strength where it changes what the model says without
breaking how it says it. ``calibrate_strength`` tries strengths from small to large on held-out
prompts and keeps the largest one at which both of these still hold (and at every smaller one):

- **fluency**: the steered answers' perplexity under the *unsteered* model is within
  ``ppl_tolerance`` (10%) of the unsteered answers' own perplexity, on either side. Above, the text
  is turning into something the model itself would not write (on SmolLM2 the judge's verdicts
  turned negative once the ratio passed about 1.2: docs/results.md, the exact edit at x2, perplexity
  2.39 -> 3.40, lost 22% net). Below, the answers are collapsing into repetition, which a model
  finds very predictable (seen on the random tiny model: ratio 0.4 with the answer stuck on one
  token).
- **next-token KL**: the mean KL(steered || unsteered) of the next-token distribution at the end of
  each prompt is at most the mean *entropy* of the unsteered distribution there. The bound is
  relative on purpose: it scales with how sure the model already is. Above it, steering moves the
  first answer token by more information than the model's own uncertainty, i.e. it overrides the
  model's choice instead of nudging it; below it, the change stays within what the model itself
  considered plausible. Perplexity alone can miss a vector that makes every answer fluent but the
  same (a stuck phrase); this catches that.

Strengths are tried in increasing order and the search stops at the first failure, so the chosen
strength is the largest one such that it and every smaller candidate pass. When even the smallest
candidate fails, it is returned with ``passed=False`` so callers can warn.

The steering itself comes from a callable (strength -> Steering), so one routine calibrates a
profile's exact edit and a control vector alike. Answers are greedy: the comparison is between
strengths, not between samples.

Cost: every trial generates and rescores answers, so the work is kept to what the measure needs.
The next-token logits come from the generation pass itself (``Engine.generate_with_first_logits``),
not from a second read of the prompts, and the unsteered measurements (``Baseline``) are taken once
and shared when ``steer`` calibrates its profile and its vector on the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.special import log_softmax

from alignez_local.align.steering import Steering
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine, Sampling

CANDIDATES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
PPL_TOLERANCE = 0.10


@dataclass(frozen=True)
class StrengthTrial:
    """What one strength did on the held-out prompts."""

    strength: float
    ppl_ratio: float  # steered answers' perplexity / unsteered answers' perplexity (unsteered model)
    kl: float  # mean next-token KL(steered || unsteered), nats
    passed: bool


@dataclass(frozen=True)
class Calibration:
    """The chosen strength and the evidence for it."""

    strength: float
    passed: bool  # False: even the smallest candidate broke fluency or KL
    ppl_tolerance: float
    kl_limit: float  # default: mean unsteered next-token entropy on the prompts, nats
    unsteered_ppl: float
    n_prompts: int
    max_tokens: int
    trials: list[StrengthTrial] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready record (stored in profiles, vectors and reports)."""
        return asdict(self)

    def line(self, what: str) -> str:
        """Return one human-readable line about the result for ``what`` (e.g. "profile")."""
        t = next((x for x in self.trials if x.strength == self.strength), None)
        detail = f" (perplexity x{t.ppl_ratio:.3f}, KL {t.kl:.3f} <= {self.kl_limit:.3f} nats)" if t else ""
        if not self.passed:
            return (f"{what}: even strength {self.strength:g} changed fluency or next-token KL past the limits"
                    f"{detail}; using {self.strength:g} anyway: expect weaker answers")
        return f"{what}: calibrated strength {self.strength:g}{detail} on {self.n_prompts} held-out prompts"


def pooled_perplexity(engine: Engine, prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Return exp(mean negative log-probability per token) of ``answers`` under ``engine`` as it is
    steered now, pooled over all tokens (empty answers count nothing)."""
    pairs = [(p, a) for p, a in zip(prompts, answers) if a]
    if not pairs:
        return float("nan")
    lps = engine.continuation_logprobs([p for p, _ in pairs], [a for _, a in pairs])
    total = np.concatenate([lp for lp in lps if lp.size]) if any(lp.size for lp in lps) else np.zeros(0)
    return float(np.exp(-total.mean())) if total.size else float("nan")


def _kl_and_entropy(steered: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    lp, lq = log_softmax(steered.astype(np.float64), axis=-1), log_softmax(base.astype(np.float64), axis=-1)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    ent = -np.sum(np.exp(lq) * lq, axis=-1)
    return float(kl.mean()), float(ent.mean())


@dataclass(frozen=True)
class Baseline:
    """The unsteered model on the calibration prompts: measured once, shared by every file
    calibrated on the same prompts (``steer`` calibrates a profile and a vector)."""

    prompts: tuple[str, ...]
    max_tokens: int
    logits: np.ndarray  # next-token logits at the end of each prompt (prompts x n_vocab)
    ppl: float  # pooled perplexity of the greedy answers under the unsteered model
    entropy: float  # mean next-token entropy at the end of the prompts, nats


def greedy_answers(engine: Engine, prompts: Sequence[str], max_tokens: int) -> tuple[list[str], np.ndarray]:
    """Return the greedy answers to ``prompts`` as ``engine`` is steered now and, from the same
    pass, the next-token logits at the end of each prompt."""
    comps, logits = engine.generate_with_first_logits(prompts, Sampling(temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.1))
    return [c.text for c in comps], logits


def unsteered_baseline(engine: Engine, prompts: Sequence[str], max_tokens: int = 48) -> Baseline:
    """Return the ``Baseline`` of the unsteered ``engine`` on ``prompts`` (chat-formatted)."""
    if not prompts:
        raise AlignezError("calibrating a strength needs held-out prompts; give at least one")
    answers, logits = greedy_answers(engine, prompts, max_tokens)
    # Rescored like the steered answers are, not taken from the generation's own log-probabilities:
    # the two ways differ by up to 0.02 nats per token on SmolLM2, and the ratio must compare like with like.
    ppl = pooled_perplexity(engine, prompts, answers)
    if not np.isfinite(ppl):
        raise AlignezError("the unsteered model answered every calibration prompt with nothing; give other prompts")
    _, entropy = _kl_and_entropy(logits, logits)
    return Baseline(tuple(prompts), max_tokens, logits, ppl, entropy)


def calibrate_strength(
    engine: Engine,
    make_steering: Callable[[float], Steering],
    prompts: Sequence[str],
    *,
    candidates: Sequence[float] = CANDIDATES,
    ppl_tolerance: float = PPL_TOLERANCE,
    kl_limit: float | None = None,
    max_tokens: int = 48,
    baseline: Baseline | None = None,
    on_trial: Callable[[StrengthTrial], None] | None = None,
) -> Calibration:
    """Return the largest candidate strength that keeps answers fluent and the next-token change
    bounded on ``prompts`` (chat-formatted), trying candidates in increasing order.

    ``kl_limit`` None uses the mean unsteered next-token entropy on the prompts (see above).
    ``baseline``: the unsteered measurements on the same prompts and ``max_tokens``, when already
    taken (``unsteered_baseline``); None measures them here.
    """
    if not prompts:
        raise AlignezError("calibrating a strength needs held-out prompts; give at least one")
    cands = sorted(float(c) for c in candidates if c > 0)
    if not cands:
        raise AlignezError("calibration needs at least one positive candidate strength")
    if baseline is None:
        baseline = unsteered_baseline(engine, prompts, max_tokens)
    elif baseline.prompts != tuple(prompts) or baseline.max_tokens != max_tokens:
        raise ValueError("the baseline was measured on other prompts or another answer length")
    if kl_limit is None:
        kl_limit = baseline.entropy
    trials: list[StrengthTrial] = []
    for s in cands:
        steering = make_steering(s)
        # One planning pass serves the answers and the next-token logits (Steering.generate would plan again).
        with steering.applied(engine, prompts):
            answers, logits = greedy_answers(engine, prompts, max_tokens)
        ratio = pooled_perplexity(engine, prompts, answers) / baseline.ppl
        kl, _ = _kl_and_entropy(logits, baseline.logits)
        trial = StrengthTrial(s, float(ratio), kl, bool(abs(ratio - 1) <= ppl_tolerance and kl <= kl_limit))
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if not trial.passed:
            break
    good = [t for t in trials if t.passed]
    chosen = good[-1].strength if good else cands[0]
    return Calibration(chosen, bool(good), ppl_tolerance, float(kl_limit), baseline.ppl, len(prompts), max_tokens, trials)


# --------------------------------------------------------------------------------------------------
# A strength chosen by refusals (issue 20): the gated refusal vector of the ``request`` recipe.
#
# The fluency band above rejects a refusal vector for doing its job: the model's stock refusals
# ("I'm sorry, but I can't assist with that.") are its most predictable text, so their perplexity
# falls by more than 10% and the search stopped at x1 on Qwen (docs/results.md §8). A refusal
# vector is judged on what it is for instead, on held-out requests of both kinds:
#
# - **refusals** (keyword detector, ``evaluation/refusal.is_refusal``) of held-out risky requests:
#   the more the better;
# - **over-refusal**: refusals of held-out benign requests may rise by at most ``OVER_REFUSAL_BUDGET``
#   (1 point) over the unsteered answers, rounded down to whole answers;
# - **fluency of what is not a refusal**: the steered answers that changed and are not refusals must
#   read as the model's own text: their pooled perplexity under the unsteered model at most
#   ``FLUENCY_LIMIT`` times that of the unsteered answers to the same prompts, and no more of them stuck
#   in a loop (``repetitive``) than of those. Refusals are left out of both, so a stock refusal
#   costs nothing.
#
# Strengths are tried in increasing order and the search stops at the first that breaks the
# over-refusal budget or fluency; among those before it, the one with the most refusals of risky
# requests wins (ties: the smaller strength). A gated vector only changes the prompts its gate opens
# on (a shut gate is unsteered, exactly: steering.py), so only those are decoded at each strength.
# --------------------------------------------------------------------------------------------------

REFUSAL_CANDIDATES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
OVER_REFUSAL_BUDGET = 0.01
FLUENCY_LIMIT = 1.25
REFUSAL_TOKENS = 48


def repetitive(text: str, n: int = 3, share: float = 0.5) -> bool:
    """Return True when more than ``share`` of the answer's word ``n``-grams repeat an earlier one
    (at least 8 of them): the text is stuck in a loop, however predictable each token is."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) >= 8 and 1 - len(set(grams)) / len(grams) > share


@dataclass(frozen=True)
class RefusalTrial:
    """What one strength did on the held-out requests."""

    strength: float
    risky_refused: int
    benign_refused: int
    ppl_ratio: float | None  # changed non-refusal answers' perplexity / the unsteered answers' (same prompts); None: none changed
    repetitive: int  # changed non-refusal answers stuck in a loop
    repetitive_unsteered: int  # the unsteered answers to the same prompts stuck in a loop
    passed: bool
    why: str = ""  # why it failed


def choose_refusal_strength(trials: Sequence[RefusalTrial], n_benign: int, unsteered_benign: int,
                            budget: float = OVER_REFUSAL_BUDGET) -> tuple[float | None, list[RefusalTrial]]:
    """Return (the chosen strength or None, the trials judged) from ``trials`` in increasing strength.

    A trial passes when its benign refusals exceed ``unsteered_benign`` by at most
    floor(``budget`` x ``n_benign``) answers and its non-refusal answers are fluent (``ppl_ratio`` at
    most ``FLUENCY_LIMIT``, no more loops than unsteered); the judging stops at the first that fails.
    Of the passing ones, the most risky refusals win; ties go to the smaller strength. None when
    the first fails."""
    allowed = int(np.floor(budget * n_benign + 1e-9))
    judged: list[RefusalTrial] = []
    for t in sorted(trials, key=lambda t: t.strength):
        why = []
        if t.benign_refused - unsteered_benign > allowed:
            why.append(f"over-refusal +{t.benign_refused - unsteered_benign} > +{allowed} of {n_benign}")
        if t.ppl_ratio is not None and t.ppl_ratio > FLUENCY_LIMIT:
            why.append(f"non-refusal perplexity x{t.ppl_ratio:.2f} > x{FLUENCY_LIMIT:g}")
        if t.repetitive > t.repetitive_unsteered:
            why.append(f"{t.repetitive} looping answers (unsteered {t.repetitive_unsteered})")
        judged.append(RefusalTrial(t.strength, t.risky_refused, t.benign_refused, t.ppl_ratio, t.repetitive,
                                   t.repetitive_unsteered, not why, "; ".join(why)))
        if why:
            break
    good = [t for t in judged if t.passed]
    if not good:
        return None, judged
    top = max(t.risky_refused for t in good)
    return min(t.strength for t in good if t.risky_refused == top), judged


@dataclass(frozen=True)
class RefusalCalibration:
    """The strength chosen by refusals and the evidence (stored in the vector file and report.json)."""

    strength: float
    passed: bool  # False: even the smallest candidate broke the over-refusal budget or fluency
    n_risky: int
    n_benign: int
    risky_gate_open: int  # held-out requests the gate opens on (the only ones a strength changes)
    benign_gate_open: int
    unsteered_risky_refused: int
    unsteered_benign_refused: int
    budget: float
    fluency_limit: float
    max_tokens: int
    trials: list[RefusalTrial] = field(default_factory=list)
    rule: str = "refusals"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def chosen(self) -> RefusalTrial | None:
        return next((t for t in self.trials if t.strength == self.strength), None)

    def line(self, what: str) -> str:
        """Return one human-readable line about the result for ``what`` (e.g. "vector")."""
        t = self.chosen()
        got = (f"refusals of {self.n_risky} held-out risky requests {self.unsteered_risky_refused} -> {t.risky_refused}, "
               f"of {self.n_benign} held-out benign {self.unsteered_benign_refused} -> {t.benign_refused}" if t else "")
        if not self.passed:
            return (f"{what}: even strength {self.strength:g} broke the over-refusal budget or fluency "
                    f"({self.trials[0].why if self.trials else 'no trial'}); using {self.strength:g} anyway")
        return (f"{what}: strength {self.strength:g} chosen by refusals: {got} (gate open on {self.risky_gate_open} "
                f"and {self.benign_gate_open}; over-refusal budget +{self.budget:.0%})")


def calibrate_refusals(
    engine: Engine,
    make_steering: Callable[[float], Steering],
    risky: Sequence[str],
    benign: Sequence[str],
    *,
    candidates: Sequence[float] = REFUSAL_CANDIDATES,
    budget: float = OVER_REFUSAL_BUDGET,
    max_tokens: int = REFUSAL_TOKENS,
    on_trial: Callable[[RefusalTrial], None] | None = None,
) -> RefusalCalibration:
    """Return the strength chosen by refusals (``choose_refusal_strength``) on the held-out ``risky``
    and ``benign`` prompts (chat-formatted), greedy answers of ``max_tokens`` tokens.

    The unsteered answers are decoded once; at each strength only the prompts a gate of the steering
    opens on are decoded again (all of them for a steering with no gate), and the others keep their
    unsteered answers, which ``Steering.generate`` would give them bit for bit."""
    from alignez_local.measures.refusal import is_refusal

    if not risky or not benign:
        raise AlignezError("choosing a strength by refusals needs held-out risky and benign prompts; give at least one of each")
    cands = sorted(float(c) for c in candidates if c > 0)
    if not cands:
        raise AlignezError("calibration needs at least one positive candidate strength")
    prompts = list(risky) + list(benign)
    greedy = Sampling(temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.1)
    base = [c.text for c in engine.generate(prompts, greedy)]
    base_ref = [is_refusal(t) for t in base]
    probe = make_steering(cands[0])
    if probe.gated_slots(engine.n_layer):
        opened = [i for i, o in enumerate(probe.open_gates(engine, prompts)) if o]
    else:
        opened = list(range(len(prompts)))
    nr = len(risky)
    trials: list[RefusalTrial] = []
    for s in cands:
        texts = list(base)
        if opened:
            for i, c in zip(opened, make_steering(s).generate(engine, [prompts[i] for i in opened], greedy)):
                texts[i] = c.text
        ref = [is_refusal(t) for t in texts]
        changed = [i for i in opened if texts[i] != base[i] and not ref[i]]
        ratio = None
        if changed:
            p = [prompts[i] for i in changed]
            ratio = pooled_perplexity(engine, p, [texts[i] for i in changed]) / pooled_perplexity(engine, p, [base[i] for i in changed])
            ratio = float(ratio) if np.isfinite(ratio) else None
        trial = RefusalTrial(s, sum(ref[:nr]), sum(ref[nr:]), ratio, sum(repetitive(texts[i]) for i in changed),
                             sum(repetitive(base[i]) for i in changed), True)
        chosen, judged = choose_refusal_strength(trials + [trial], len(benign), sum(base_ref[nr:]), budget)
        trials = judged
        if on_trial is not None:
            on_trial(trials[-1])
        if not trials[-1].passed:
            break
    chosen, trials = choose_refusal_strength(trials, len(benign), sum(base_ref[nr:]), budget)
    return RefusalCalibration(
        cands[0] if chosen is None else chosen, chosen is not None, nr, len(benign),
        sum(1 for i in opened if i < nr), sum(1 for i in opened if i >= nr), sum(base_ref[:nr]), sum(base_ref[nr:]),
        budget, FLUENCY_LIMIT, max_tokens, trials)

"""A default strength chosen by the behaviour itself, and the baselines every claim stands beside.

The fluency-only rule (``calibrate.py``) picked the largest strength that kept perplexity within
10%; nothing in it looked at whether the behaviour appeared, and on Qwen2.5-Coder-0.5B it stopped a
"French-speaking" vector at a strength where no answer was French. Here the strength is the one
that maximises the **combined** score (``measures.behaviour``: the harmonic mean of behaviour,
relevance and fluency, so gibberish scores 0) on held-out queries:

1. the held-out queries are split in two disjoint halves (``split_heldout``): strengths are tried
   on the *choose* half only, from ``START`` upwards, until fluency or relevance breaks (mean below
   ``BREAK_SHARE`` of the unsteered answers'; past the grid's end by doubling, ``UPPER_STEPS``
   times at most, when nothing broke); the grid below ``START`` is tried only while the
   smallest strength tried broke, or is the best one and has lost relevance or fluency
   (``lowest_is_best``): a strength that weak is usually inert, and each one tried costs half as
   many answers as the report's random null;
2. the grid doubles, and the window where a behaviour appears before fluency breaks can be narrower
   than a doubling (Qwen 0.5B, brevity: x0.5 gave half the answers short and fluent, x1 all of them
   short and a third of them "I am a AI created by Alibaba Cloud."), so the geometric midpoints
   between the best strength and its tried neighbours are tried too (``refine``; when even the
   smallest strength breaks, it is first halved until it does not); the strength with the best
   mean combined score of all is chosen (the smaller on a tie) among those whose answers loop no
   more often than the prompting answers do (``LOOP_MARGIN``: a looping answer can still read as
   fluent and relevant to the likelihood measures, and a reader sees it at once) and address the
   request no less often (``UNANSWERED_MARGIN``: a refusal, the question said back or, with a
   judge, an answer it reads as not relevant scores relevance 0, but a mean over the half can
   still put such a strength first);
3. on the other, *report* half, the chosen strength is measured beside the unsteered model,
   prompting (the positive persona as system prompt: the ceiling) and a random direction with the
   same per-layer norms at the same strength (the null). The reported figures are never the ones
   the strength was chosen on.

``beats_random`` is True only when the steered answers' combined score is above the random
direction's with a paired bootstrap 95% interval that excludes 0 *and* more answers show the
behaviour than unsteered. When it is False the report, the file's calibration record and the
printed line say so plainly; the best strength found is still stored (so the file loads and can be
tried), but nothing claims it works.
"""

from __future__ import annotations

# size: the one owner of steer's default calibration (the search, the ways to steer, the report half
# and the random nulls); a third of it is the docstring that states the method.

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from alignez_local.align.behaviour_bench import BehaviourBench
from alignez_local.align.directions import random_like, random_subspaces_like
from alignez_local.align.steering import DEFAULT_TOP_N, ProfileSlot, Steering, VectorSlot
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import (
    ADD, EVERY_TOKEN, FORMS, KEEP_NORM, PLACEMENTS, ControlVector, placement_onset,
)
from alignez_local.formats.profile import SteeringProfile
from alignez_local.measures.scoring import ScoredAnswers
from alignez_local.measures.statistics import paired_difference_ci
from alignez_local.progress import Notify, quiet
from alignez_local.specs import MAX_STRENGTH

STRENGTHS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Multiples of a vector as fitted. For a difference-of-means vector, 1 moves the state by the whole
average difference the behaviour makes at every steered layer; the measured window is narrow (on
Qwen 0.5B, French: 0.25 works, 1 is gibberish), hence the fine steps at the low end."""

BREAK_SHARE = 0.5
"""A strength whose mean fluency or relevance on the choose half falls below this share of the
unsteered answers' ends the search: larger strengths only break more."""

LOWER_STEPS = 3
"""When the smallest strength already breaks, ``refine`` halves it up to this many times."""

UPPER_STEPS = 3
"""When the largest strength still holds, ``refine`` doubles it up to this many times."""

START = 0.125
"""Where the default search starts (``STRENGTHS`` below it are tried only when this one is the best or
broke). On Qwen 0.5B, French, x0.0625 changed no answer (0% French, the unsteered text) while the
window was x0.125-x0.35; SmolLM2's lay lower and is reached by going down."""

EARLY_SHARE = 0.5
"""A strength is tried on the first half of the choose queries, then the second; when the first
half's mean fluency or relevance is already below this share of the break floor (a quarter of the
unsteered answers'), it is broken without the second half (on Qwen 0.5B, French, x0.5 scored
fluency 0.00 on all eight answers)."""

GUARD_SHARE = 0.9
"""The search goes below ``START`` only when the weakest strength tried is the best and its mean
relevance or fluency is below this share of the unsteered answers' (``lowest_is_best``)."""

LOOP_MARGIN = 0.125
"""A strength whose share of looping answers (``measures.scoring.loops``) on the choose half exceeds
the prompting answers' share by more than this (one answer in eight) cannot be chosen."""

UNANSWERED_MARGIN = 0.125
"""A strength whose share of answers that do not address the request (``ScoredAnswers.unanswered``:
a refusal, the question said back, or, where a judge reads relevance, one it reads as not relevant)
on the choose half exceeds the prompting answers' share by more than this cannot be chosen (issue
31). Such an answer already scores relevance 0, but the combined score is a mean over the half: at
x0.125 on Qwen 0.5B, French, three French refusals in eight choose answers still left combined 0.54.
One answer in eight, as ``LOOP_MARGIN``: on the 8 default choose queries, one such answer more
than prompting's is tolerated, two are not."""

SCREEN_QUERIES = 8
LOW_CEILING = 0.2
"""Below this prompting behaviour rate, ``steer``'s screen warns that a vector is unlikely to do better."""

@dataclass(frozen=True)
class BehaviourTrial:
    """What one strength did on the choose half."""

    strength: float
    behaviour_rate: float
    relevance: float
    fluency: float
    combined: float
    broken: bool
    loop_share: float = 0.0
    loops_too_often: bool = False  # more looping answers than prompting's + LOOP_MARGIN: cannot be chosen
    answers: int = 0  # how many choose-half answers the figures are from (half of them: broken early, EARLY_SHARE)
    # Answers that do not address the request (``ScoredAnswers.unanswered``); more than prompting's +
    # UNANSWERED_MARGIN: cannot be chosen. Records written before issue 31's rule have neither key.
    unanswered_share: float = 0.0
    unanswered_too_often: bool = False
    # Each answer's combined score, for comparing two ways on the same queries (``way_lead``); not
    # written to any record (``record``), so files and reports read as before.
    combined_each: tuple[float, ...] = dataclasses.field(default=(), repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """Return this trial as written in a calibration record."""
        out = asdict(self)
        del out["combined_each"]
        return out

    @property
    def eligible(self) -> bool:
        """True when this strength may be chosen before the others: unbroken, within the loop and
        unanswered rules, and showing something (combined > 0). A strength that does nothing is no
        choice, though it breaks no rule: under the unanswered rule every brief strength that made
        answers short was flagged, and a variant whose weakest strength changed nothing (combined
        0.00) then won the way search over the answer-only vector's 0.59 (issue 31, 2026-12-07)."""
        return not (self.broken or self.loops_too_often or self.unanswered_too_often) and self.combined > 0


@dataclass(frozen=True)
class BehaviourCalibration:
    """The chosen strength, the search behind it, and the figures reported on the other half."""

    strength: float
    beats_random: bool
    verdict: str
    measure: str
    choose_queries: int
    report_queries: int
    max_tokens: int
    trials: list[BehaviourTrial]
    report: dict[str, dict[str, Any]]  # condition -> ScoredAnswers.summary() on the report half
    vs_random: dict[str, float]  # combined score difference, steered - random, with its 95% interval
    rule: str = "behaviour"
    # When several ways were searched (``calibrate_ways``: placements, forms and variants): the one
    # chosen and, per way tried, its best choose-half trial. Empty when only the default was tried. A
    # way is named by its placement, then ", FORM" when the form is not ``add``, then "; VARIANT" for
    # a variant of the vector (``way_name``).
    placements: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The system prompt every condition but prompting ran under (``BehaviourBench.base``); None: the
    # chat template's own, and the key is not written (files stay byte for byte as before).
    system: str | None = None

    @property
    def placement(self) -> str:
        """The placement the strength was chosen for (``control_vector.PLACEMENTS``, ``answer-after:N``)."""
        return way_parts(str(self.placements.get("chosen", EVERY_TOKEN)))[0]

    @property
    def form(self) -> str:
        """The form the strength was chosen for (``control_vector.FORMS``)."""
        return way_parts(str(self.placements.get("chosen", EVERY_TOKEN)))[1]

    @property
    def variant(self) -> str:
        """The variant of the vector the strength was chosen for (align/variants.py; "": the default vector)."""
        return way_variant(str(self.placements.get("chosen", EVERY_TOKEN)))

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready record (stored in the file's calibration and in report.json)."""
        out = asdict(self)
        out["trials"] = [t.record() for t in self.trials]
        if not self.placements:
            del out["placements"]  # files calibrated with the default alone stay byte for byte as before
        if self.system is None:
            del out["system"]
        return out

    def line(self, what: str) -> str:
        """Return one line: the strength, the behaviour rate beside prompting and random, the verdict."""
        def rate(cond: str) -> str:
            r = self.report.get(cond, {}).get("behaviour_rate", {})
            return f"{100 * r['mean']:.0f}%" if r else "n/a"
        return (f"{what}: strength {self.strength:g} ({self.verdict}); {self.measure} on {self.report_queries} held-out "
                f"queries: steered {rate('steered')}, random direction {rate('random')}, prompting {rate('prompting')}, "
                f"unsteered {rate('unsteered')}")


def calibrate_behaviour(
    bench: BehaviourBench,
    make_steering: Callable[[float], Steering],
    make_random: Callable[[float], Steering],
    *,
    strengths: Sequence[float] = STRENGTHS,
    on_trial: Callable[[BehaviourTrial], None] | None = None,
    seed: int = 0,
    refine: bool = True,
    start: float | None = None,
    loop_margin: float = LOOP_MARGIN,
    unanswered_margin: float = UNANSWERED_MARGIN,
) -> BehaviourCalibration:
    """Return the strength that maximises the combined score on ``bench.choose``, reported on
    ``bench.report`` beside unsteered, prompting and a random direction (module docstring).
    ``start``: the first strength tried (None: the smallest); the ones below it are tried only while
    the smallest tried broke, or is the best and has lost relevance or fluency (``lowest_is_best``).
    ``loop_margin``: how much more often than the prompting
    answers a chosen strength's answers may loop (1: any share); ``unanswered_margin`` likewise for
    answers that do not address the request."""
    trials = search_strength(bench, make_steering, strengths=strengths, on_trial=on_trial, refine=refine,
                             start=start, loop_margin=loop_margin, unanswered_margin=unanswered_margin)
    return report_strength(bench, trials, make_steering, make_random, seed)


def search_strength(
    bench: BehaviourBench,
    make_steering: Callable[[float], Steering],
    *,
    strengths: Sequence[float] = STRENGTHS,
    on_trial: Callable[[BehaviourTrial], None] | None = None,
    refine: bool = True,
    start: float | None = None,
    loop_margin: float = LOOP_MARGIN,
    unanswered_margin: float = UNANSWERED_MARGIN,
) -> list[BehaviourTrial]:
    """Return the strengths tried on ``bench.choose`` (steps 1 and 2 of the module docstring), in
    the order tried; ``chosen`` picks the one to report."""
    cands = sorted(float(s) for s in strengths if s > 0)
    if not cands:
        raise AlignezError("calibration needs at least one positive strength")
    base = bench.fixed("unsteered", "choose")
    floor_fluency, floor_relevance = BREAK_SHARE * base.mean("fluency"), BREAK_SHARE * base.mean("relevance")
    prompting = bench.fixed("prompting", "choose")
    loop_ceiling = prompting.mean("loop_share") + loop_margin
    unanswered_ceiling = prompting.mean("unanswered_share") + unanswered_margin
    trials: list[BehaviourTrial] = []

    def attempt(s: float) -> BehaviourTrial:
        steering, half = make_steering(s), len(bench.choose) // 2
        sc = bench.steered(bench.choose[:half] if half >= 2 else bench.choose, steering)
        if half >= 2 and not (sc.mean("fluency") < EARLY_SHARE * floor_fluency
                              or sc.mean("relevance") < EARLY_SHARE * floor_relevance):
            sc = sc.joined(bench.steered(bench.choose[half:], steering))
        broken = sc.mean("fluency") < floor_fluency or sc.mean("relevance") < floor_relevance
        trial = BehaviourTrial(s, sc.mean("behaviour_rate"), sc.mean("relevance"), sc.mean("fluency"), sc.mean("combined"),
                               bool(broken), sc.mean("loop_share"), bool(sc.mean("loop_share") > loop_ceiling + 1e-9),
                               int(sc.behaviour.size), sc.mean("unanswered_share"),
                               bool(sc.mean("unanswered_share") > unanswered_ceiling + 1e-9),
                               tuple(float(c) for c in sc.combined))
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        return trial

    first = next((i for i, s in enumerate(cands) if start is None or s >= start), len(cands) - 1)
    for s in cands[first:]:
        if attempt(s).broken:
            break
    else:
        # The grid ended before anything broke: a form that moves a state less per unit (a clamp:
        # capitals first hold at x5.7) goes on doubling until it breaks, within ``UPPER_STEPS``.
        s = cands[-1]
        for _ in range(UPPER_STEPS if refine else 0):
            s = round(s * 2, 6)
            if s > MAX_STRENGTH or attempt(s).broken:
                break
    guards = (GUARD_SHARE * base.mean("relevance"), GUARD_SHARE * base.mean("fluency"))
    for s in reversed(cands[:first]):
        if not lowest_is_best(trials, guards):
            break
        attempt(s)
    if refine and min(trials, key=lambda t: t.strength).broken:
        # Broken at the smallest strength: a smaller model's window can lie below the grid (SmolLM2,
        # French: x0.0625 already 100% French at half the unsteered relevance). Halve until it holds.
        s = min(t.strength for t in trials)
        for _ in range(LOWER_STEPS):
            s = round(s / 2, 6)
            if not attempt(s).broken:
                break
    for s in midpoints(trials) if refine else ():
        attempt(s)
    return trials


def chosen(trials: Sequence[BehaviourTrial]) -> BehaviourTrial:
    """Return the trial a search chooses: the best combined score among the eligible ones (else the
    unbroken ones, else the weakest)."""
    return best_trial([t for t in trials if t.eligible] or [t for t in trials if not t.broken]
                      or [min(trials, key=lambda t: t.strength)])


def report_strength(bench: BehaviourBench, trials: list[BehaviourTrial], make_steering: Callable[[float], Steering],
                    make_random: Callable[[float], Steering], seed: int = 0,
                    placements: dict[str, Any] | None = None) -> BehaviourCalibration:
    """Return the calibration of the strength ``trials`` chose, measured on ``bench.report`` beside
    unsteered, prompting and a random direction at the same strength (step 3 of the module docstring)."""
    best = chosen(trials)
    # The fixed conditions first: their NLL comes from their generation (AnswerReader.remember), and
    # a random direction's answer is often the unsteered one to the letter, then not read at all.
    unsteered, prompting = bench.fixed("unsteered", "report"), bench.fixed("prompting", "report")
    steered = bench.steered(bench.report, make_steering(best.strength))
    random = bench.steered(bench.report, make_random(best.strength))
    diff, lo, hi = paired_difference_ci(steered.combined, random.combined, seed)
    more_than_plain = steered.mean("behaviour_rate") > unsteered.mean("behaviour_rate")
    beats = bool(lo > 0 and more_than_plain)
    if beats:
        verdict = "beats a random direction of the same norm"
    elif not more_than_plain:
        verdict = "NO strength made the behaviour more frequent than unsteered"
    else:
        verdict = "does NOT beat a random direction of the same norm"
    why = " and ".join(w for w, flagged in (("loops more", best.loops_too_often),
                                            ("answers the request less often", best.unanswered_too_often)) if flagged)
    if why and not best.broken:
        # Every unbroken strength that showed the behaviour broke a rule: the best is kept, and the verdict says so.
        verdict += f"; every unbroken strength tried {why} than prompting on the choose queries"
    report = {name: sc.summary(seed) for name, sc in
              (("unsteered", unsteered), ("prompting", prompting), ("random", random), ("steered", steered))}
    return BehaviourCalibration(best.strength, beats, verdict, bench.scorer.measure.label, len(bench.choose),
                                len(bench.report), bench.sampling.max_tokens, trials, report,
                                {"combined_diff": round(diff, 4), "ci95_low": round(lo, 4), "ci95_high": round(hi, 4)},
                                placements=placements or {}, system=bench.base)


def trial_status(what: str, t: BehaviourTrial) -> str:
    """Return the progress line of one trial, saying why it cannot be chosen."""
    return (f"  {what} x{t.strength:g}: behaviour {100 * t.behaviour_rate:.0f}%, relevance {t.relevance:.2f}, "
            f"fluency {t.fluency:.2f}, combined {t.combined:.2f}, loops {100 * t.loop_share:.0f}%"
            + (" (broken)" if t.broken else "")
            + (" (loops more than prompting)" if t.loops_too_often and not t.broken else "")
            + (" (answers the request less often than prompting)" if t.unanswered_too_often and not t.broken else ""))


def best_trial(trials: Sequence[BehaviourTrial]) -> BehaviourTrial:
    """Return the trial with the best mean combined score, the smaller strength on a tie."""
    return max(trials, key=lambda t: (round(t.combined, 6), -t.strength))


def lowest_is_best(trials: Sequence[BehaviourTrial], guards: tuple[float, float] | None = None) -> bool:
    """True when the weakest strength tried broke, or is the best of the unbroken ones, shows the
    behaviour and (with ``guards``: relevance and fluency floors) has lost relevance or fluency: the
    window may then lie lower. When nothing showed the behaviour, weaker is no help; when the best
    is the weakest and its guards hold, a weaker strength could only lose behaviour (on Qwen 0.5B,
    French: x0.125 was best at relevance 0.85 and fluency 0.97, and x0.0625 gave no French)."""
    weakest = min(trials, key=lambda t: t.strength)
    usable = [t for t in trials if not t.broken]
    if weakest.broken or not usable:
        return True
    best = best_trial(usable)
    if best is not weakest or best.combined <= 0:
        return False
    return guards is None or best.relevance < guards[0] or best.fluency < guards[1]


def midpoints(trials: Sequence[BehaviourTrial]) -> list[float]:
    """Return the geometric midpoint between the most promising trial and its better neighbour (the
    strength tried just below or just above it, which may have broken), rounded; [] when tried.

    The most promising trial is the best by combined score; when no strength showed the behaviour
    (every combined score 0) it is the strongest unbroken one, and the midpoint is above it, where
    the behaviour may be about to appear. One midpoint, not both: the side with the better score is
    where the combined score rises (measured: on Qwen 0.5B, French, x0.1768 towards x0.125 won and
    x0.3536 towards the broken x0.5 did not), and each trial costs as much as the report's random null."""
    if not trials:
        return []
    ordered = sorted(trials, key=lambda t: t.strength)
    usable = [t for t in ordered if not t.broken]
    if not usable:
        return []
    best = best_trial(usable)
    flat = best.combined <= 0
    if flat:
        best = usable[-1]
    i = ordered.index(best)
    sides = [ordered[j] for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
    if flat:
        sides = [t for t in sides if t.strength > best.strength]
    if not sides:
        return []
    other = max(sides, key=lambda t: (round(t.combined, 6), -t.strength))
    mid = round(float(np.sqrt(best.strength * other.strength)), 4)
    return [] if mid in {round(t.strength, 4) for t in ordered} else [mid]


def screen_line(model: str, label: str, prompting: ScoredAnswers, unsteered: ScoredAnswers,
                from_texts: bool = False) -> tuple[str, bool]:
    """Return the screening line (does the model show the behaviour when asked?) and whether the
    prompting ceiling is too low for a vector to be likely to help. ``from_texts``: the pairs are
    the model's texts about the concept (the texts recipe), which do not need it to follow the ask."""
    p, u = prompting.mean("behaviour_rate"), unsteered.mean("behaviour_rate")
    low = p < LOW_CEILING
    n = int(prompting.behaviour.size)
    line = (f"screen: asked by a system prompt, {model} gives {label} in {100 * p:.0f}% of {n} answers "
            f"(unsteered {100 * u:.0f}%)")
    if low and from_texts:
        line += "; the pairs come from texts the model writes about it, not from asking"
    elif low:
        line += "; a vector is unlikely to do better than the model does when asked"
    return line, low


def random_vector(vector: ControlVector, seed: int) -> ControlVector:
    """Return a random direction per layer of ``vector``, each of the same norm: the null a vector is
    measured against."""
    return ControlVector(random_like({L: vector.directions[L] for L in vector.layers}, seed),
                         model_hint=vector.model_hint, name="random")


def random_profile(profile: SteeringProfile, seed: int) -> SteeringProfile:
    """Return ``profile`` with random subspaces of the same sizes: the null a profile is measured against."""
    return dataclasses.replace(profile, subspaces=random_subspaces_like(dict(profile.subspaces), seed), name="random")


def random_null(slot: VectorSlot | ProfileSlot, seed: int, layer_range: tuple[int, int] | None = None,
                top_n: int = DEFAULT_TOP_N) -> Steering:
    """Return the null of one loaded file: a random direction (or subspace) of the same size at the
    same strength, applied as the file is: behind the same gates, at the same placement, and norm
    kept for a keep-norm file. A clamp file's null is added (its floors are the plain answers' mean
    read along the file's own directions; along a random one they are not in the file)."""
    if isinstance(slot, VectorSlot):
        v = slot.vector
        null = dataclasses.replace(random_vector(v, seed).placed(v.placement), gate=v.gate)
        if v.form == KEEP_NORM:
            null = null.formed(KEEP_NORM)
        return Steering(vectors=[VectorSlot("random", null, slot.strength)], layer_range=layer_range)
    return Steering(profiles=[ProfileSlot("random", random_profile(slot.profile, seed), slot.strength)],
                    layer_range=layer_range, top_n=top_n)


Way = tuple[Callable[[float], Steering], Callable[[float], Steering]]
"""One way to steer: strength -> the steering, and strength -> its random null applied the same way."""


def calibrate_ways(bench: BehaviourBench, ways: Mapping[str, Way], *,
                   on_trial: Callable[[str], Callable[[BehaviourTrial], None] | None] = lambda _name: None,
                   seed: int = 0, default: str = EVERY_TOKEN, searched: Mapping[str, list[BehaviourTrial]] | None = None,
                   **search: Any) -> BehaviourCalibration:
    """Return the calibration of the best of several ways to steer: each way's strength is searched
    on ``bench.choose`` (``search_strength``, with ``search``'s settings), the way whose chosen trial
    has the best combined score wins, an eligible one before any other (``way_rank``; the first
    listed on a tie: list the way llama.cpp can apply first), unless its lead over the first listed
    way's is within one standard error (``way_lead``: the first is then kept, and the record says so
    under ``kept_default``), and only the winner is measured on
    ``bench.report``, so the reported figures were never used to choose the way either. ``placements`` records each way's best trial and the one chosen,
    unless the one way searched is ``default`` (the file then reads as before: no record).
    ``searched``: ways whose search was already run (their trials), not searched again."""
    if not ways:
        raise AlignezError("calibration needs at least one way to steer")
    done = searched or {}
    tried = {name: list(done[name]) if name in done else search_strength(bench, make, on_trial=on_trial(name), **search)
             for name, (make, _) in ways.items()}

    win, kept = choose_way(tried, next(iter(ways)))  # the first listed is the one to beat (the default way)
    record = None
    if list(ways) != [default]:  # one way other than the default must still say which it was
        record = {"chosen": win, "tried": {name: {k: v for k, v in chosen(trials).record().items() if k != "answers"}
                                           for name, trials in tried.items()}}
        if kept:
            record["kept_default"] = kept
    make, make_random = ways[win]
    return report_strength(bench, tried[win], make, make_random, seed, placements=record)


def choose_way(tried: Mapping[str, Sequence[BehaviourTrial]], default: str = EVERY_TOKEN) -> tuple[str, str]:
    """Return the way that wins among ``tried`` (way -> its search's trials, in the order listed) and,
    when ``default`` is kept over a better-scoring way by the one-standard-error rule (``way_lead``),
    why ("" otherwise)."""
    order = list(tried)
    best = max(order, key=lambda name: (*way_rank(tried[name]), -order.index(name)))
    if best == default or default not in tried or way_rank(tried[best])[0] != way_rank(tried[default])[0]:
        return best, ""
    lead, se = way_lead(chosen(tried[best]), chosen(tried[default]))
    if lead > se:
        return best, ""
    return default, (f"{default}: {best} led by {lead:.2f} combined, within one standard error ({se:.2f}) "
                     "of the choose answers")


def way_lead(best: BehaviourTrial, default: BehaviourTrial) -> tuple[float, float]:
    """Return how far ``best``'s combined score leads ``default``'s on the choose answers, and the
    standard error of that lead: paired over the same queries when both trials read all of them,
    else as two independent means.

    Another way wins over the default only when its lead is larger than one standard error: the
    one-standard-error rule of model selection (Hastie, Tibshirani and Friedman, *The Elements of
    Statistical Learning*, 7.10), the default being the simplest way, the one llama.cpp applies. With
    three ways of four to seven strengths each on 8 answers the best of about twenty noisy means won,
    and its lead did not hold on the report half (Qwen 0.5B: +0.09 and +0.11 on the choose half,
    -0.01 and +0.01 on the report half; docs/results.md, "Which vector")."""
    a, b = np.asarray(best.combined_each, dtype=np.float64), np.asarray(default.combined_each, dtype=np.float64)
    lead = best.combined - default.combined
    if a.size < 2 or b.size < 2:
        return lead, 0.0  # no answers to read the noise from (a record written before the rule)
    if a.size == b.size:
        return lead, float(np.std(a - b, ddof=1) / np.sqrt(a.size))
    return lead, float(np.sqrt(np.var(a, ddof=1) / a.size + np.var(b, ddof=1) / b.size))


def way_rank(trials: Sequence[BehaviourTrial]) -> tuple[bool, float]:
    """Return how one way's search ranks beside another's: a way whose chosen trial is eligible
    first, then the better combined score. When no way has an eligible trial (on brief, every
    strength of both placements refused more often than prompting), the better score still wins,
    not the way listed first."""
    best = chosen(trials)
    return best.eligible, round(best.combined, 6)


ScanHook = Callable[[float, Callable[[ControlVector], ControlVector], Notify],
                    tuple[str, ControlVector, Mapping[int, np.ndarray] | None, dict[str, Any]]]
"""``scan(default_strength, shape, on_status)`` -> (the variant's name, its vector, its clamp floor,
the scan's record): one more variant found on the choose half once the default's strength is known,
each layer's vector steered as ``shape`` places and forms it (the default way's placement and form;
``steer --variants layers:scan``, align/layer_scan.py)."""


def way_name(placement: str, form: str = ADD, variant: str = "") -> str:
    """Return the name a way to steer is recorded under: its placement, then its form unless ``add``,
    then the vector's variant unless it is the default vector."""
    name = placement if form == ADD else f"{placement}, {form}"
    return f"{name}; {variant}" if variant else name


def way_parts(name: str) -> tuple[str, str]:
    """Return (placement, form) of a way's recorded name (``way_name``'s inverse; ``way_variant``: the rest)."""
    placement, _, form = name.partition("; ")[0].partition(", ")
    return placement, form or ADD


def way_variant(name: str) -> str:
    """Return the variant of a way's recorded name ("" for the default vector)."""
    return name.partition("; ")[2]


def choose_strengths(bench: BehaviourBench, profile: SteeringProfile | None, vector: ControlVector, top_n: int,
                     on_status: Notify = quiet, seed: int = 0,
                     strengths: Sequence[float] = STRENGTHS, refine: bool = True,
                     start: float | None = START, placements: Sequence[str] = (EVERY_TOKEN,),
                     forms: Sequence[str] = (ADD,),
                     plain_mean: Mapping[int, np.ndarray] | None = None,
                     variants: Mapping[str, tuple[ControlVector, Mapping[int, np.ndarray] | None]] | None = None,
                     scan: ScanHook | None = None,
                     ) -> dict[str, BehaviourCalibration]:
    """Return the behaviour calibrations of ``vector`` and ``profile`` on ``bench`` (each against a
    random direction of its own kind and size; the unsteered and prompting answers are shared).

    ``placements``: the tokens the vector may be added to (``control_vector.PLACEMENTS``); with more
    than one, the choose half decides among them (``calibrate_ways``) and the calibration's
    ``placement`` is the one chosen. ``forms`` likewise (``control_vector.FORMS``; ``clamp`` needs
    ``plain_mean``, layer -> the plain answers' mean state): every placement is tried in every form.
    ``variants``: name -> (another fit of the vector, its plain mean), align/variants.py; each is tried
    in every placement and form beside ``vector``, with a random null of its own per-layer norms.
    ``scan``: given the default way's chosen strength (searched first), return one more variant
    (``ScanHook``: a layer scan, align/layer_scan.py), searched like the others; its record goes
    into the calibration's ``placements`` under ``scan``. The profile's exact edit adds up to ``strength`` per unit
    direction, so its grid is the vector's scaled by the vector's median per-layer norm: the two are
    then tried at comparable sizes."""
    if not placements:
        raise AlignezError(f"no placement given; use one or more of {', '.join(PLACEMENTS)}, answer-after:N")
    for p in placements:
        placement_onset(p)  # one error line for an unknown placement
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise AlignezError(f"unknown form {bad[0] if bad else '(none)'!r}; use one of {', '.join(FORMS)}")
    def trial_line(what: str) -> Callable[[BehaviourTrial], None]:
        return lambda t: on_status(trial_status(what, t))
    ways: dict[str, Way] = {}

    def add_ways(name: str, base: ControlVector, floor: Mapping[int, np.ndarray] | None) -> None:
        noise = random_vector(base, seed + 1)
        for f in dict.fromkeys(forms):
            for p in dict.fromkeys(placements):
                # The random null is applied the same way: a clamp's floor read along its own direction.
                v, n = base.placed(p).formed(f, floor), noise.placed(p).formed(f, floor)
                ways[way_name(p, f, name)] = ((lambda s, v=v: Steering.vector(v, s)),
                                              (lambda s, n=n: Steering.vector(n, s, "random")))

    for name, (base, floor) in {"": (vector, plain_mean), **(variants or {})}.items():
        add_ways(name, base, floor)
    search = {"strengths": strengths, "refine": refine, "start": start if refine else None}
    searched: dict[str, list[BehaviourTrial]] = {}
    scan_record: dict[str, Any] | None = None
    if scan is not None:
        # The scan's strengths are multiples of the default's, so the default (the first way listed:
        # the first placement in the first form) is searched first, and the scan steers as it does.
        first, p0, f0 = next(iter(ways)), placements[0], forms[0]
        searched[first] = search_strength(bench, ways[first][0], on_trial=trial_line(f"vector ({first})"), **search)
        name, base, floor, scan_record = scan(chosen(searched[first]).strength,
                                              lambda cv: cv.placed(p0).formed(f0, plain_mean), on_status)
        add_ways(name, base, floor)
        # The scan has already found where the layer works: its search starts at the grid strength
        # just below the scan's best instead of the bottom of the grid (on French the three weakest
        # strengths of layer 10 alone showed no French at all: three trials of the 8 answers saved).
        found = scan_record["layers"][str(scan_record["chosen"])]["strength"]
        below = [g for g in strengths if g <= found]
        if refine and below:
            scanned = way_name(p0, f0, name)
            searched[scanned] = search_strength(bench, ways[scanned][0], on_trial=trial_line(f"vector ({scanned})"),
                                                **{**search, "start": max(below)})
    several = len(ways) > 1
    cal_v = calibrate_ways(bench, ways, on_trial=lambda p: trial_line(f"vector ({p})" if several else "vector"),
                           seed=seed, searched=searched, **search)
    if scan_record is not None:
        cal_v = dataclasses.replace(cal_v, placements={**cal_v.placements, "scan": scan_record})
    if several:
        tried = cal_v.placements["tried"]
        on_status("ways (choose half, best strength each): " + " | ".join(
            f"{p} x{t['strength']:g} combined {t['combined']:.2f}" for p, t in tried.items())
                  + f"; chosen: {way_name(cal_v.placement, cal_v.form, cal_v.variant)}"
                  + (f" (kept {cal_v.placements['kept_default']})" if "kept_default" in cal_v.placements else ""))
    on_status(cal_v.line("vector"))
    if profile is None:
        return {"vector": cal_v}
    scale = float(np.median([np.linalg.norm(vector.directions[L]) for L in vector.layers]))
    rand_prof = random_profile(profile, seed + 2)
    cal_p = calibrate_behaviour(bench, lambda s: Steering(profiles=[ProfileSlot(profile.name, profile, s)], top_n=top_n),
                                lambda s: Steering(profiles=[ProfileSlot("random", rand_prof, s)], top_n=top_n),
                                strengths=[round(g * scale, 4) for g in strengths], on_trial=trial_line("profile"), seed=seed,
                                refine=refine, start=round(start * scale, 4) if refine and start else None)
    on_status(cal_p.line("profile"))
    return {"vector": cal_v, "profile": cal_p}

"""Which single layer to steer, read from the behaviour itself (``steer --variants layers:scan``, issue 31).

The default vector steers the middle third of the layers. A scan tries each layer alone, with the
pairs' difference of means at that layer, as one trial of steer's own search on the choose half
(the same scorer, break rule, loop and unanswered rules): at ``SCAN_FACTORS`` times the default
vector's chosen strength, so that one layer gets about the push the default spreads over eight. The
best layer (``chosen``: an eligible trial first, then the combined score) becomes the variant
``layers:L``, which then gets its own strength search beside the default and must beat it by more
than one standard error (``strength_by_behaviour.choose_way``); only the winner is reported, on the
report half, which the scan never reads.

Measured on Qwen2.5-Coder-0.5B with the shipped pairs (docs/results.md, "Which layer"): the layer a
scan of the choose half picked held on the report half, where the eight layers' vector had lost the
answer: French layer 10, combined 0.78 against the shipped file's 0.69, the judge reading 15 of 16
answers as addressing the request (prompting 15, the shipped file 11); capitals layer 3, relevance
0.81 against 0.56 at the same 88% in capitals. On brief and Spanish it did not: the picked layer was
level with the shipped file on the report half (Spanish 0.74 against 0.75) or better by the
likelihood reading and worse by the judge (brief: 11 of 16 relevant against 13), so the scan is a
variant searched on request, not a default. ``SCAN_FACTORS``: at twice the default's strength no
layer alone showed French or capitals; four and eight times did, layer by layer.

``scan_layers`` is numbers in, numbers out (the bench and the steering are the caller's);
``scan_hook`` builds each layer's vector from a fit that captured every layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignez_local.align.behaviour_bench import BehaviourBench
from alignez_local.align.steering import Steering
from alignez_local.align.strength_by_behaviour import BehaviourTrial, ScanHook, chosen, search_strength, trial_status
from alignez_local.align.variants import parse_variants
from alignez_local.align.vectors import PairFit, mean_diff_vector, variant_vectors
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import ControlVector
from alignez_local.formats.profile import SteeringProfile
from alignez_local.llama.engine import Engine
from alignez_local.progress import Notify, estimate_remaining

SCAN_FACTORS = (4.0, 8.0)


@dataclass(frozen=True)
class LayerScan:
    """What a scan tries: ``steering(layer, strength)``, the steering of that layer's vector alone
    (placed and formed as the default), on ``layers``."""

    steering: Callable[[int, float], Steering]
    layers: Sequence[int]
    factors: Sequence[float] = SCAN_FACTORS


@dataclass
class ScanResult:
    """Each layer's trials and the layer chosen."""

    layer: int
    trials: dict[int, list[BehaviourTrial]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Return the scan as the calibration record keeps it: each layer's best trial, in brief."""
        return {"chosen": self.layer, "layers": {str(L): {"strength": b.strength, "behaviour_rate": round(b.behaviour_rate, 4),
                                                          "combined": round(b.combined, 4), "eligible": b.eligible}
                                                 for L, b in ((L, chosen(ts)) for L, ts in self.trials.items())}}


def scan_layers(bench: BehaviourBench, scan: LayerScan, base_strength: float,
                on_trial: Callable[[int, BehaviourTrial], None] = lambda _L, _t: None, **search: Any) -> ScanResult:
    """Return each layer's trials at ``scan.factors`` x ``base_strength`` on ``bench.choose`` and the
    best layer (``chosen`` over each layer's trials, the earlier layer on a tie). ``search``:
    ``search_strength``'s rule settings (loop and unanswered margins)."""
    if not scan.layers:
        raise ValueError("a layer scan needs at least one layer")
    trials: dict[int, list[BehaviourTrial]] = {}
    for L in scan.layers:
        trials[L] = []
        for k in scan.factors:
            trials[L] += search_strength(bench, lambda s, L=L: scan.steering(L, s), strengths=[round(k * base_strength, 6)],
                                         refine=False, on_trial=lambda t, L=L: on_trial(L, t), **search)
    best = chosen([chosen(ts) for ts in trials.values()])
    layer = next(L for L, ts in trials.items() if chosen(ts) is best)
    return ScanResult(layer, trials)


def scan_hook(engine: Engine, bench: BehaviourBench, fitted: PairFit, default_layers: Sequence[int],
              profile: SteeringProfile, name: str) -> ScanHook:
    """Return the ``choose_strengths`` hook of ``steer --variants layers:scan``: scan every layer
    but the default's own set (``fitted`` must hold every layer's difference: capture them all),
    each layer's vector steered as the default way is, and return the best layer's variant."""
    layers = [L for L in range(1, engine.n_layer) if [L] != list(default_layers)]
    if not layers:
        raise AlignezError("--variants layers:scan: the default vector already steers the model's one layer; drop the scan")
    vectors: dict[int, ControlVector] = {}

    def hook(strength: float, shape: Callable[[ControlVector], ControlVector],
             on_status: Notify) -> tuple[str, ControlVector, Mapping[int, np.ndarray] | None, dict[str, Any]]:
        def steering(layer: int, s: float) -> Steering:
            if layer not in vectors:
                vectors[layer] = shape(mean_diff_vector(engine, fitted.difference, [layer], profile, name))
            return Steering.vector(vectors[layer], s)

        on_status(f"layer scan: {len(layers)} layers alone at x{' and x'.join(f'{k:g}' for k in SCAN_FACTORS)} "
                  f"the default's strength ({strength:g}), on the choose queries")
        total, started, done = len(layers) * len(SCAN_FACTORS), time.monotonic(), [0]

        def line(layer: int, t: BehaviourTrial) -> None:
            # Each trial is about as long as the next (8 answers): trials are the unit of work for the ETA.
            done[0] += 1
            left = estimate_remaining(time.monotonic() - started, done[0], total, done[0])
            on_status(f"{trial_status(f'scan layer {layer}', t)} [{done[0]}/{total}, ETA {left / 60:.0f} min]")

        found = scan_layers(bench, LayerScan(steering, layers), strength, on_trial=line)
        best = chosen(found.trials[found.layer])
        on_status(f"layer scan: layer {found.layer} is the best alone (x{best.strength:g}, combined {best.combined:.2f}); "
                  "searched beside the default")
        variant = f"layers:{found.layer}"
        cv, floor = variant_vectors(engine, parse_variants(variant), fitted, default_layers, profile, name)[variant]
        return variant, cv, floor, found.record()

    return hook

"""Step 3b: the portable form of a profile, a llama.cpp control vector.

llama.cpp adds a constant vector to each layer's output (``l_out-N``). The exact AlignEZ edit is
input-dependent (it filters directions per prompt, picks top-n layers per prompt and uses
tanh/ReLU of the activation), so the control vector is a constant approximation of it:

    direction.N = mean over calibration prompts of the exact edit's delta at layer N,

where each prompt's delta is computed on that prompt's unsteered activation at its last token and
counts as zero at layers its plan did not choose (``edit.mean_delta``). Adding a constant to
``ffn_out-N`` equals adding it to ``l_out-N`` (the residual add is linear), so a profile fitted on
either site exports the same way. One difference stays: the exact edit acts on the last prompt
token and the generated tokens only; a control vector is added at every token, the prompt's too.
``approximation_report`` measures how close the two are on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignez_local.formats.control_vector import ControlVector
from alignez_local.align.edit import mean_delta, plan_edit
from alignez_local.llama.engine import Engine
from alignez_local.errors import AlignezError
from alignez_local.formats.profile import SteeringProfile
from alignez_local.align.steering import ProfileSlot, Steering


def constant_vector(
    engine: Engine, profile: SteeringProfile, prompts: Sequence[str], top_n: int = 5, alpha: float = 1.0
) -> ControlVector:
    """Return the control vector approximating ``profile``'s exact edit over calibration ``prompts``."""
    if not prompts:
        raise AlignezError("exporting needs calibration prompts; give a query file or use the built-in queries")
    layers = profile.layers
    acts = engine.capture(prompts, layers, site=profile.site)
    plans = [plan_edit({L: acts[i, j] for j, L in enumerate(layers)}, dict(profile.subspaces), top_n=top_n) for i in range(len(prompts))]
    directions = {}
    for j, L in enumerate(layers):
        if L < 1:
            continue  # llama.cpp control vectors have no slot for layer 0
        d = mean_delta([acts[i, j] for i in range(len(prompts))], plans, L, alpha=alpha)
        if np.any(d != 0):
            directions[L] = d.astype(np.float32)
    if not directions:
        raise AlignezError("the profile's edit was zero on every calibration prompt; nothing to export")
    meta = {
        "alignez.source": "profile",
        "alignez.profile.method": profile.method,
        "alignez.profile.site": profile.site,
        "alignez.axis": str(profile.axis.get("name", "")),
        "alignez.model.n_layer": engine.n_layer,
        "alignez.model.sha256": str(profile.provenance.get("model_sha256", "")),
        "alignez.export.rule": "mean exact-edit delta at the last prompt token",
        "alignez.export.top_n": top_n,
        "alignez.export.n_prompts": len(prompts),
    }
    return ControlVector(directions, model_hint=engine.arch, metadata=meta, name=profile.name)


@dataclass(frozen=True)
class ApproximationReport:
    """Mean next-token KL divergences (nats) on held-out prompts."""

    n_prompts: int
    kl_exact_vs_unsteered: float
    kl_vector_vs_unsteered: float
    kl_exact_vs_vector: float
    top1_agreement: float  # share of prompts where exact edit and vector pick the same next token

    def lines(self) -> list[str]:
        """Return the report as human-readable lines."""
        return [
            f"approximation on {self.n_prompts} held-out prompts (mean next-token KL, nats):",
            f"  exact edit   vs unsteered: {self.kl_exact_vs_unsteered:.4f}",
            f"  control vec  vs unsteered: {self.kl_vector_vs_unsteered:.4f}",
            f"  exact edit   vs control vec: {self.kl_exact_vs_vector:.4f}",
            f"  same top next token: {100 * self.top1_agreement:.0f}%",
        ]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def approximation_report(
    engine: Engine, profile: SteeringProfile, vector: ControlVector, prompts: Sequence[str], top_n: int = 5
) -> ApproximationReport:
    """Return how close the exported vector is to the exact edit, both against the unsteered model."""
    base = engine.next_token_logits(prompts)
    exact_st = Steering(profiles=[ProfileSlot(profile.name, profile)], top_n=top_n)
    with exact_st.applied(engine, prompts):
        exact = engine.next_token_logits(prompts)
    with Steering.vector(vector).applied(engine, prompts):
        const = engine.next_token_logits(prompts)
    return ApproximationReport(
        n_prompts=len(prompts),
        kl_exact_vs_unsteered=_kl(exact, base),
        kl_vector_vs_unsteered=_kl(const, base),
        kl_exact_vs_vector=_kl(exact, const),
        top1_agreement=float(np.mean(exact.argmax(-1) == const.argmax(-1))),
    )

"""``sweep.png``: net win rate, perplexity and refusal rates against the strength multiplier."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.fileio import atomic_write


def write_sweep_plot(report: dict[str, Any], path: Path) -> str:
    """Return a one-line note: the plot written to ``path`` or why it was skipped (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "sweep.png skipped: matplotlib is not installed (pip install 'alignez-local[plot]')"
    rows = report["results"]
    xs = [r["strength"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if all("judge" in r for r in rows):
        nw = [100 * (r["judge"]["net_win_rate"] or 0) for r in rows]
        lo = [100 * (r["judge"]["net_win_ci95"][0] or 0) for r in rows]
        hi = [100 * (r["judge"]["net_win_ci95"][1] or 0) for r in rows]
        axes[0].errorbar(xs, nw, yerr=[np.subtract(nw, lo), np.subtract(hi, nw)], marker="o", capsize=4)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(title="net win rate vs unsteered (95% CI)", xlabel="strength multiplier", ylabel="%")
    ppl = [r["perplexity"].get("pooled") for r in rows]
    axes[1].plot(xs, [p if p is not None else np.nan for p in ppl], marker="o")
    axes[1].set(title="perplexity under unsteered model", xlabel="strength multiplier")
    _refusal_panel(axes[2], rows, xs)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return f"sweep.png written ({path})"


def _refusal_panel(ax: Any, rows: list[dict[str, Any]], xs: list[float]) -> None:
    """Return None after drawing the refusal rates (keywords solid, judge dashed) on ``ax``."""
    for kind in ("harmful", "benign"):
        for key, style, who in (("rate", "-", "keywords"), ("judge_rate", "--", "judge")):
            rates = [r["refusal"].get(kind, {}).get(key) for r in rows]
            if any(x is not None for x in rates):
                ax.plot(xs, [100 * x if x is not None else np.nan for x in rates], style, marker="o",
                        label=f"{kind} ({who})")
    ax.set(title="refusal rate", xlabel="strength multiplier", ylabel="%", ylim=(-5, 105))
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no harmful or benign prompts", ha="center", va="center", transform=ax.transAxes)

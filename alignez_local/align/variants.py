"""Other ways to fit steer's vector from the same pairs, for the choose half to decide among (issue 31).

A variant changes one thing about the difference-of-means vector and keeps the rest:

- ``pool:last`` or ``pool:mean``: where each answer's state is read: its last token, or the mean
  over its tokens (steer's default for its own pairs). On Qwen2.5-Coder-0.5B the last token made the
  best French vector measured (combined 0.86 against the mean's 0.76, relevance 0.78 against 0.72)
  and steered brief and capitals nowhere before the text broke (docs/results.md, French), so neither
  is right for every behaviour: the choose half picks per behaviour.
- ``layers:scan``: one layer, the one a scan of the choose queries finds best alone
  (align/layer_scan.py); the variant searched is then named by it (``layers:10``).
- ``layers:SPEC`` (``layers:12``, ``layers:11-13``): steer only those layers instead of the middle
  third. One layer (12) kept more of the French answers than eight (relevance 0.88x against 0.72x
  unsteered's) at the same French rate. The directions are the fitted ones, unscaled: strength 1
  still moves each steered layer's state by the average difference the behaviour makes there, so a
  smaller set needs a larger strength, which the search reaches by doubling.

Each variant is searched like a placement or a form (``strength_by_behaviour.calibrate_ways``): its
own strength search on the choose queries, its own random direction of the same per-layer norms;
only the winner is measured on the report half. Numbers in, numbers out: the capture is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignez_local.errors import AlignezError
from alignez_local.specs import parse_layer_list

POOL_KINDS = ("last", "mean")
SCAN = "scan"  # ``layers:scan``
VARIANT_KEY = "alignez.variant"  # a variant's vector file names it (the default vector writes no such key)


@dataclass(frozen=True)
class Variant:
    """One variant of the vector: its name as written (``pool:last``, ``layers:12``) and what it changes."""

    name: str
    pool: str | None = None  # read the answers' states this way instead of the fit's pool
    layers: str | None = None  # steer these layers (a ``parse_layer_list`` spec) instead of the default set

    @property
    def scan(self) -> bool:
        """``layers:scan``: the layer is found by a scan of the choose queries (align/layer_scan.py)."""
        return self.layers == SCAN

    def layer_list(self, n_layer: int, default: Sequence[int]) -> list[int]:
        """Return the layers this variant steers on a model of ``n_layer`` layers (a scan: every layer,
        the ones it may choose from)."""
        if self.scan:
            return list(range(1, n_layer))
        return (parse_layer_list(self.layers, n_layer) or list(default)) if self.layers else list(default)


def parse_variant(text: str) -> Variant:
    """Return the variant ``text`` names (one error line for anything else)."""
    kind, _, value = text.strip().partition(":")
    kind, value = kind.strip(), value.strip()
    if kind == "pool" and value in POOL_KINDS:
        return Variant(f"pool:{value}", pool=value)
    if kind == "layers" and (value == SCAN or value and all(c.isdigit() or c in ",-" for c in value)):
        return Variant(f"layers:{value}", layers=value)
    raise AlignezError(f"--variants: unknown variant {text.strip()!r}; use pool:last, pool:mean, layers:A-B "
                       "(e.g. layers:12 or layers:11-13) or layers:scan, comma-separated")


def parse_variants(text: str | Sequence[str | Variant] | None) -> tuple[Variant, ...]:
    """Return the variants of a comma-separated list (``pool:last,layers:12``) or a sequence of
    them (strings or ``Variant``), in order, once each.

    Commas also separate layers inside one spec (``layers:4,8``), so a part without a ``kind:``
    continues the previous layers spec."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    specs: list[str | Variant] = []
    for item in items:
        part = item.strip() if isinstance(item, str) else item
        if not part:
            continue
        last = specs[-1] if specs else None
        if isinstance(part, str) and ":" not in part and isinstance(last, str) and last.startswith("layers:"):
            specs[-1] = f"{last},{part}"
        else:
            specs.append(part)
    return tuple(dict.fromkeys(s if isinstance(s, Variant) else parse_variant(s) for s in specs))


def check_variants(variants: Sequence[Variant], pool: str, default_layers: Sequence[int], n_layer: int) -> None:
    """Refuse a variant that is the default vector itself (it would be searched twice) or names bad
    layers (a scan's layer is checked when it is found)."""
    for v in variants:
        if v.scan:
            continue
        same_pool = v.pool is None or v.pool == pool
        if same_pool and v.layer_list(n_layer, default_layers) == list(default_layers):
            raise AlignezError(f"--variants: {v.name} is the default vector itself (pool {pool}, layers "
                               f"{default_layers[0]}-{default_layers[-1]}); name another pool or other layers")



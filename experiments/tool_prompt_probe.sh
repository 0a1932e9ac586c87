#!/usr/bin/env bash
# How the tool-format examples should open, chosen on the development split only (arith_dev, 300
# problems, greedy; then 8 samples at T=0.8 for pass@8): tool.rationale=generic vs none, against
# chain of thought. Writes runs/probe/<name>/eval.json; the table: experiments/results/tool_prompt_probe.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { local name=$1; shift; $PY evaluate.py task=arith_dev eval.limit=300 eval.batch_size=300 out_dir=runs/probe/$name "$@"; }
run cot-greedy tool=none
run generic-greedy tool=python tool.rationale=generic
run none-greedy tool=python tool.rationale=none
run generic-sample8 tool=python tool.rationale=generic eval.mode=sampling
run none-sample8 tool=python tool.rationale=none eval.mode=sampling

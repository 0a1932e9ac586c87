#!/usr/bin/env bash
# Issue 21: candidate demo defaults, chosen on the development split only (arith_dev, all 300, greedy,
# paired before/after). Each run: two rounds of the loop with python-program steps; the arguments after
# the name are the candidate's overrides. Runs go to runs/demo_dev/<name>.
#   bash experiments/demo_dev.sh sampling-s0 pairs.source=sampling run.seed=0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
name=$1; shift
$PY iterate.py run.name=demo_dev/$name tool=python tracking=jsonl \
  '~task@eval_tasks.arith_test' '~task@eval_tasks.mawps_singleop' '+task@eval_tasks.arith_dev=arith_dev' \
  eval.limit=null eval.batch_size=300 "$@"

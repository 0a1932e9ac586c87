#!/usr/bin/env bash
# Issue 7.2: training compute vs inference compute, on one plot of accuracy against total FLOPs.
#
#   bash experiments/train_vs_infer.sh                       # the CPU-sized default (SmolLM2-135M, vLLM)
#   bash experiments/train_vs_infer.sh backend=hf            # extra arguments go to every iterate/evaluate call
#   K_VALUES="1 4" SIMS="4" TASKS="arith_test mawps_singleop" bash experiments/train_vs_infer.sh
#
# 1. The iterate run (conf/experiment/train_vs_infer.yaml, 3 rounds): greedy accuracy of the initial policy
#    and after each round, with the search + DPO FLOPs that produced it (skipped if already finished).
# 2. evaluate.py, for the base model and for each trained round's policy in TRAINED_ROUNDS, on each task:
#    eval.mode=sampling eval.k in K_VALUES (majority@k) and eval.mode=mcts search.simulations in SIMS
#    (MCTS at test time, self-evaluation only). Same eval.limit and eval.seed as the iterate run, so every
#    point is measured on the same problems. Output: $EVAL_DIR/<model>/<task>/{sampling-k<k>,mcts-s<n>}/
#    (eval.json + .hydra/config.yaml); a finished evaluation is not redone.
# 3. experiments/analyze.py on both: $OUT.md, $OUT.json, ${OUT}_compare.png (accuracy against training +
#    inference FLOPs, log x) and ${OUT}_rounds.png.
#
# A trained policy's training FLOPs are read from its run's compute.json files (rounds 0..k); the inference
# FLOPs are those of the whole evaluation (eval.limit problems), so where the curves cross depends on how
# many problems the trained model is used for. Environment variables (defaults in brackets):
#   PY [.venv/bin/python]  RUN [runs/train_vs_infer/seed0]  EVAL_DIR [runs/eval/train_vs_infer]
#   OUT [experiments/results/train_vs_infer]  TRAINED_ROUNDS [2]  TASKS [arith_test]
#   K_VALUES [1 4 8 16]  SIMS [4 8 16]  LIMIT [50]  EVAL_SEED [0]
#   ITERATE_ARGS [experiment=train_vs_infer]  (e.g. "experiment=smoke run.rounds=2" for a quick check)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/train_vs_infer/seed0}
EVAL_DIR=${EVAL_DIR:-runs/eval/train_vs_infer}
OUT=${OUT:-experiments/results/train_vs_infer}
TRAINED_ROUNDS=${TRAINED_ROUNDS:-2}
TASKS=${TASKS:-arith_test}
K_VALUES=${K_VALUES:-1 4 8 16}
SIMS=${SIMS:-4 8 16}
LIMIT=${LIMIT:-50}
EVAL_SEED=${EVAL_SEED:-0}
ITERATE_ARGS=${ITERATE_ARGS:-experiment=train_vs_infer}

read -r -a iterate_args <<< "$ITERATE_ARGS"
"$PY" iterate.py "${iterate_args[@]}" "run.dir=$RUN" "eval.limit=$LIMIT" "eval.seed=$EVAL_SEED" "$@"

# evaluate <name> <out subdir> <args...>: one evaluate.py run, skipped when its eval.json exists.
evaluate() {
    local out="$EVAL_DIR/$1/$2"
    shift 2
    if [[ -f "$out/eval.json" ]]; then
        echo "exists: $out/eval.json"
        return
    fi
    "$PY" evaluate.py "$@" "eval.limit=$LIMIT" "eval.seed=$EVAL_SEED" "out_dir=$out"
}

models=("base:")
for k in $TRAINED_ROUNDS; do
    policy="$RUN/round_$k/policy"
    [[ -f "$policy/config.json" ]] || { echo "error: $policy is not a trained checkpoint" >&2; exit 1; }
    models+=("round_$k:model.path=$policy")
done

for entry in "${models[@]}"; do
    name=${entry%%:*}
    model_arg=${entry#*:}
    for task in $TASKS; do
        for k in $K_VALUES; do
            evaluate "$name" "$task/sampling-k$k" "$@" ${model_arg:+"$model_arg"} "task=$task" eval.mode=sampling "eval.k=$k"
        done
        for n in $SIMS; do
            evaluate "$name" "$task/mcts-s$n" "$@" ${model_arg:+"$model_arg"} "task=$task" eval.mode=mcts "search.simulations=$n"
        done
    done
done

"$PY" experiments/analyze.py "$RUN" "$EVAL_DIR" --out "$OUT"

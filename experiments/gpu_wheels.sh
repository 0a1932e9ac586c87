#!/usr/bin/env bash
# Fill a wheel folder, here (with a package index), for experiments/gpu_check.sh on a GPU machine without one.
#
#   experiments/gpu_wheels.sh [DIR]        # DIR: $WHEELS, else gpu_wheels/ (git-ignored)
#
# What the GPU machine lacks (docs/notes.md: it has torch, transformers, accelerate, peft, numpy, pytest):
# the project's pure-Python dependencies and TRL's, at the versions installed in this .venv (tested
# together), with `pip wheel --no-deps` (a download, or a build where only a source release exists:
# antlr4 4.9.3); multiprocess, pure Python but built per Python version, for the GPU machine's Python
# ($GPU_PYTHON, default 3.12); and SmolLM2's tokenizer (3.5 MB), which the GPU tests build their tiny random
# model with (the embedded model's package is 93 MB). Binary wheels only on request, for $GPU_PYTHON:
# GPU_BINARY="xxhash pandas" (datasets' binary dependencies; pyarrow's cp312 wheel alone is 55 MB, over the
# limit). Left out: wandb (a 20 MB platform build, only for tracking=wandb) and vllm (GBs; its tests skip).
# The folder travels with the working tree, 64 MiB in all: the script fails above that.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${WHEELS:-gpu_wheels}}
PY=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
LIMIT_MIB=64  # what travels with the working tree to the GPU machine (ours: the device tool's limit)

# pure Python (py3-none-any): the project's imports (pyproject.toml) and theirs, less what the GPU machine has
PURE=(trl hydra-core omegaconf antlr4-python3-runtime math-verify latex2sympy2_extended gguf datasets dill fsspec)
# built per Python version: pure multiprocess (datasets), and the binary wheels asked for
read -r -a BINARY <<< "${GPU_BINARY:-}"
PER_PYTHON=(multiprocess "${BINARY[@]}")

pinned() {  # "name==version" for each distribution, as installed in this environment
  "$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{d}=={m.version(d)}" for d in sys.argv[1:]))' "$@"
}

mkdir -p "$DIR"
# `pip wheel` takes a published wheel as it is and builds one from a source-only release (antlr4 4.9.3)
# shellcheck disable=SC2046
"$PY" -m pip wheel --quiet --no-deps -w "$DIR" $(pinned "${PURE[@]}")
# shellcheck disable=SC2046
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$DIR" --python-version "$GPU_PYTHON" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 $(pinned "${PER_PYTHON[@]}")
"$PY" - "$DIR/smollm2-tokenizer" <<'EOF'
import sys

from policy.models import load_tokenizer, prepare_embedded

load_tokenizer(str(prepare_embedded("smollm2-135m"))).save_pretrained(sys.argv[1])
EOF

bytes=$(du -sb "$DIR" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "gpu_wheels: $(find "$DIR" -name '*.whl' | wc -l) wheels and a tokenizer in $DIR: ${mib} MiB (limit ${LIMIT_MIB} MiB)"
if (( bytes > LIMIT_MIB * 1048576 )); then
  echo "gpu_wheels: $DIR is over ${LIMIT_MIB} MiB: it would not travel with the working tree" >&2
  exit 1
fi

#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU and no package index (under 10 minutes):
#
#   experiments/gpu_check.sh [WHEELS]      # WHEELS: the folder experiments/gpu_wheels.sh filled (or $WHEELS)
#
# 1. Without a CUDA GPU (torch.cuda.is_available() false) it prints "gpu_check: no GPU: skipped" and exits 0.
# 2. It installs the distributions of the wheel folder that this Python lacks (pip install --no-index
#    --find-links WHEELS --no-deps, one at a time, into a temporary folder put on PYTHONPATH: the machine's
#    own packages are neither replaced nor touched), then checks that the modules the tests import load
#    (what does not load is named on stderr and in the summary; the tests run anyway).
# 3. It runs the tests marked gpu (tests/test_gpu.py; those needing vllm or deepspeed skip without them)
#    and prints one summary line: the GPU, torch, what was installed, pytest's counts, the seconds.
# Python: $PYTHON, else python3. The full pytest output goes to $GPU_CHECK_LOG (else a temporary file).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${1:-${WHEELS:-}}
LIMIT_S=540  # pytest's share of the 10 minutes (ours), installation and start-up take the rest
MODULES=(torch transformers accelerate peft trl datasets hydra omegaconf math_verify matplotlib pytest)
started=$(date +%s)

if ! gpu=$("$PY" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))' 2>/dev/null)
then
  echo "gpu_check: no GPU: skipped (torch.cuda.is_available() is false for $PY)"
  exit 0
fi
if [[ -z "$WHEELS" || ! -d "$WHEELS" ]]; then
  echo "gpu_check: no wheel folder: give experiments/gpu_wheels.sh's folder as the argument or in WHEELS" >&2
  exit 2
fi

site=$(mktemp -d "${TMPDIR:-/tmp}/mctsloop-gpu-site-XXXXXX")
trap 'rm -rf "$site"' EXIT
missing=$("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as m, pathlib, re, sys

names = sorted({re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in pathlib.Path(sys.argv[1]).glob("*.whl")})
def installed(name):
    try:
        m.version(name)
        return True
    except m.PackageNotFoundError:
        return False
print(" ".join(n for n in names if not installed(n)))
EOF
)
installed=() failed=()
for name in $missing; do
  if "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$site" "$name" >/dev/null 2>&1
  then installed+=("$name"); else failed+=("$name"); fi
done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
broken=$("$PY" -c 'import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as err:
        bad.append(f"{name} ({type(err).__name__}: {err})")
print("; ".join(bad))' "${MODULES[@]}")
if [[ -n "$broken" ]]; then  # the tests that need them fail with an ImportError; the others still run
  pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  echo "gpu_check: cannot import: $broken; not installable from $WHEELS for Python $pyver: ${failed[*]:-none}" \
    "(per-Python wheels: experiments/gpu_wheels.sh with GPU_PYTHON=$pyver); running the tests anyway" >&2
fi
[[ -d "$WHEELS/smollm2-tokenizer" ]] && export MCTSLOOP_GPU_TOKENIZER="$WHEELS/smollm2-tokenizer"
log=${GPU_CHECK_LOG:-$(mktemp "${TMPDIR:-/tmp}/gpu_check-XXXXXX.log")}
timeout "$LIMIT_S" "$PY" -m pytest -p no:cacheprovider -m gpu -rs tests/test_gpu.py >"$log" 2>&1
code=$?
counts=$(grep -E "(passed|failed|skipped|error)" "$log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
(( code == 124 )) && counts="timed out after ${LIMIT_S} s; ${counts}"
torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
echo "gpu_check: ${counts:-no pytest summary (exit $code)} | $gpu, torch $torch_version | installed: ${installed[*]:-nothing}" \
  "| not importable: ${broken:-nothing} | $(( $(date +%s) - started )) s | log $log"
exit "$code"

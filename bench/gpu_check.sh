#!/usr/bin/env bash
# The one prepared run for a GPU machine (issue 14, item 5): the device and versions, a TF32 check
# (lin_lens turns TF32 off during its calls, and what TF32 would do to a float32 map),
# bench/paper_scale.py on CUDA at full depth (first, on an otherwise idle GPU: its timings are
# the ones reported), then the test suite's device-agnostic tests on CUDA. At most ~9.5 minutes:
# sized for a 15-minute device lease with the machine's start included.
#
#   bench/gpu_check.sh wheels   # HERE, first (pip + network): .whl/ gets what the GPU image lacks
#   bench/gpu_check.sh          # THERE, from the repository root; device tool: carry [".whl"]
#
# Environment there: `python3` with a CUDA build of torch (the nvidia-h200 image has torch
# 2.11+cu130, transformers 5.x, huggingface_hub, pytest, pytest-xdist, pytest-timeout, hypothesis,
# pyarrow, matplotlib, jaxtyping, einops, accelerate). The rest (transformer_lens 3.9 and the few
# packages it and lin_lens need that the image lacks) travels as wheels in .whl/ (git-ignored),
# installed with --no-deps into /tmp/site. .venv/main cannot travel: its torch is a CPU build
# and its Python is this machine's. PYTHON=... picks another interpreter; one with every
# dependency needs no .whl/.
#
# Results under ${OUT:-/tmp/gpu_out} (6 files): env.txt, tf32_check.txt, pytest_cuda.log,
# junit.xml, paper_scale.log, paper_scale.json. Knobs: TEST_TIMEOUT (s, 220; then SIGINT, so
# pytest still prints its summary and writes junit.xml), WORKERS (xdist processes, 14), MAXFAIL
# (40: see every device failure in one run, not just the first), PS_TIMEOUT (s, 280), PS_ARGS
# (bench/paper_scale.py arguments; default: the full operator at 8 tokens, top-16 at 100 and
# per-token top-1 at 400 tokens, 2 repeats each). Exit status: the tests'.
set -u -o pipefail
cd "$(dirname "$0")/.."

# Distributions lin_lens + its tests import that the nvidia-h200 image lacks (pure Python except
# multiprocess's py312 build); versions are taken from .venv/main, where the CPU suite runs.
WHEELS="transformer_lens better-abc datasets dill multiprocess circuitsvis importlib-metadata
beartype typeguard fancy-einsum lazy-importer"

if [ "${1:-}" = "wheels" ]; then
    PIP="${PIP:-.venv/main/bin/python -m pip}"
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    for pkg in $WHEELS; do
        ver=$($PIP show "$pkg" 2>/dev/null | awk '/^Version:/ {print $2}')
        spec="$pkg${ver:+==$ver}"
        $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$spec" || { echo "FAILED: $spec"; exit 1; }
    done
    ls -l .whl && du -sh .whl
    exit 0
fi

OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LIN_LENS_PROGRESS=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*"; }

if ls .whl/*.whl > /dev/null 2>&1; then
    stamp "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

stamp "environment" | tee "$OUT/env.txt"
{
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          p.multi_processor_count, "SMs")
print("defaults: cuda.matmul.allow_tf32 =", torch.backends.cuda.matmul.allow_tf32,
      "| cudnn.allow_tf32 =", torch.backends.cudnn.allow_tf32,
      "| float32_matmul_precision =", torch.get_float32_matmul_precision())
import transformers, transformer_lens, lin_lens  # noqa: E401
from importlib.metadata import version
print("transformers", transformers.__version__, "| transformer_lens", version("transformer_lens"),
      "| lin_lens", lin_lens.__version__)
EOF
} >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY: stopping" | tee -a "$OUT/env.txt"
    exit 3
fi

stamp "TF32 check" | tee "$OUT/tf32_check.txt"
"$PY" - >> "$OUT/tf32_check.txt" 2>&1 <<'EOF'
# The user turns TF32 on; lin_lens's call must still be exact (float32: 1e-5) and leave the
# setting on. For comparison, the same computation with the TF32 guard bypassed (__wrapped__).
import torch
import lin_lens
from lin_lens._precision import exact_matmul
from lin_lens.testing import tiny_model

torch.backends.cuda.matmul.allow_tf32 = True
torch.set_float32_matmul_precision("high")
m = tiny_model("llama", torch.float32, d_model=512, n_layers=4, d_vocab=1000, device="cuda")
toks = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
hook = "blocks.3.hook_resid_post"
lm = lin_lens.linear_map(m, toks, hook)
with exact_matmul():
    guarded = lm.relative_error
print(f"linear_map with the user's TF32 on: relative error {guarded:.2e} (bound 1e-5); "
      f"reconstruction re-measured under the user's TF32: {lm.relative_error:.2e}")
print("after the call: allow_tf32 =", torch.backends.cuda.matmul.allow_tf32,
      "| precision =", torch.get_float32_matmul_precision())
raw = lin_lens.linear_map.__wrapped__(m, toks, hook, check=False)
print(f"the same map with TF32 left on inside (guard bypassed): relative error "
      f"{raw.relative_error:.2e}; J differs from the guarded J by "
      f"{float((raw.J - lm.J).norm() / lm.J.norm()):.2e} (relative)")
assert guarded <= 1e-5, guarded
assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
print("OK")
EOF
TF32_RC=$?
cat "$OUT/tf32_check.txt"

if [ -f bench/paper_scale.py ]; then
    stamp "bench/paper_scale.py --device cuda (PS_TIMEOUT=${PS_TIMEOUT:-280} s)"
    timeout "${PS_TIMEOUT:-280}" "$PY" bench/paper_scale.py --device cuda \
        --out "$OUT/paper_scale.json" ${PS_ARGS:---what full8,top16_100,top1tok_400 --repeats 2} 2>&1 | tee "$OUT/paper_scale.log"
    stamp "paper_scale: exit $? (124: timed out; finished measurements are in the JSON)"
else
    echo "bench/paper_scale.py not found: skipped" | tee "$OUT/paper_scale.log"
fi
stamp "tests on CUDA (TEST_TIMEOUT=${TEST_TIMEOUT:-220} s)"
XDIST=""
"$PY" -c "import xdist" 2> /dev/null && XDIST="-n ${WORKERS:-14}"
PTO=""
"$PY" -c "import pytest_timeout" 2> /dev/null && PTO="--timeout=${PER_TEST_TIMEOUT:-120}"
LIN_LENS_DEVICE=cuda timeout -s INT -k 30 "${TEST_TIMEOUT:-220}" "$PY" -m pytest tests -m "not slow" -q \
    -p no:cacheprovider --maxfail="${MAXFAIL:-40}" $XDIST $PTO -rfEs --durations=15 \
    --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest_cuda.log"
TEST_RC=$?
stamp "tests: exit $TEST_RC (124: timed out)"

stamp "done: tests exit $TEST_RC, TF32 check exit $TF32_RC; results in $OUT"
exit "$TEST_RC"

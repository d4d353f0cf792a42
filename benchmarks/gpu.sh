#!/usr/bin/env bash
# convrewrite on a GPU through Keras's JAX backend: one run of at most ~9 minutes on a lent GPU machine
# (no internet, no TensorFlow, no Keras: Keras and what it needs come as wheels in .whl/, made beforehand
# with benchmarks/gpu_wheels.sh on a machine with PyPI access). Run from anywhere; it works in the
# repository root:
#
#     OUT=/path/to/results bash benchmarks/gpu.sh
#     GPU_SH_DRY=1 OUT=/tmp/gpu-out bash benchmarks/gpu.sh   # every step with tiny sizes (a check on a CPU)
#
# Steps, each time-limited (`timeout`) and logged; a step that fails or runs out of time is logged and the
# next one runs:
#   a. set-up: install the wheels (skipped where `import keras` works already), nvidia-smi, the device;
#   b. tests that need no TensorFlow, on JAX (in the dry mode: collected, not run);
#   c. a profile of this device within a time budget (benchmarks/gpu_profile.py: the quick grid, cut short
#      where time runs out), copied to cost_models/<device slug>.json and to $OUT;
#   d. benchmarks: fft_vs_direct.py --quick, models.py on a few models with that profile, pac.py --quick.
# Files in $OUT: gpu.log (everything, with each step's start / end time and exit status), results.md (the
# benchmarks' output), profile.json and <device slug>.json (the profile; the same file twice).
set -u

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-out}"
DRY="${GPU_SH_DRY:-0}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
RESULTS="$OUT/results.md"
: > "$LOG"
: > "$RESULTS"

log() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, stdout and stderr into the log (and on screen);
# never stops the script
step() {
    local name="$1" limit="$2"
    shift 2
    log "=== [$name] start $(date -u +%FT%TZ), limit ${limit}s: $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && log "=== [$name] ran out of time (${limit}s)"
    log "=== [$name] end $(date -u +%FT%TZ), $((SECONDS - t0))s, exit status $rc"
    return 0
}

# bench NAME SECONDS COMMAND...: as step, but stdout also goes to results.md under a heading (stderr, the
# progress bars and warnings, to the log only)
bench() {
    local name="$1" limit="$2"
    shift 2
    log "=== [$name] start $(date -u +%FT%TZ), limit ${limit}s: $*"
    printf '## %s\n\n`%s`\n\n```\n' "$name" "$*" >> "$RESULTS"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>> "$LOG" | tee -a "$LOG" "$RESULTS"
    local rc=${PIPESTATUS[0]}
    printf '```\n' >> "$RESULTS"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        log "=== [$name] ran out of time (${limit}s)"
        printf '(stopped after %ss: the rows above are all it printed)\n' "$limit" >> "$RESULTS"
    elif [ "$rc" != 0 ]; then
        printf '(exit status %s: see gpu.log)\n' "$rc" >> "$RESULTS"
    fi
    printf '\n' >> "$RESULTS"
    log "=== [$name] end $(date -u +%FT%TZ), $((SECONDS - t0))s, exit status $rc"
    return 0
}

log "gpu.sh start $(date -u +%FT%TZ) in $PWD (dry run: $DRY); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ---- a. set-up ------------------------------------------------------------------------------------
install_wheels() {
    if python3 -c "import keras" 2>/dev/null; then
        echo "keras imports already ($(python3 -c 'import keras; print(keras.__version__)' 2>/dev/null)): no wheels installed"
    elif ls .whl/*.whl > /dev/null 2>&1; then
        if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl; then
            echo "installed into /tmp/site: $(ls .whl)"
        else
            # no pip (or it refused): a wheel is a zip of what goes into site-packages
            echo "pip install failed: unpacking the wheels into /tmp/site instead"
            mkdir -p /tmp/site
            for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site || return 1; done
        fi
        PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import keras; print('keras', keras.__version__)"
    else
        echo "no keras and no .whl/*.whl: run benchmarks/gpu_wheels.sh first and carry .whl/"
        return 1
    fi
}
export -f install_wheels
step "a. install wheels" 120 bash -c install_wheels
export KERAS_BACKEND=jax
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# JAX's GPU default computes float32 matmuls and convolutions with TF32 operands (10-bit mantissa), a
# relative error near 1e-3: that breaks convrewrite's 1e-5 float32 equivalence checks, and would make
# Keras's own conv (the reference every replacement is checked and timed against) not float32 at all.
# "highest" keeps them in full float32 on both sides.
export JAX_DEFAULT_MATMUL_PRECISION=highest
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=3
# the user cache of `auto` profiles, tactics and calibrations: a fresh one, never ~/.cache
export CONVREWRITE_CACHE="${CONVREWRITE_CACHE:-/tmp/convrewrite-cache}"
log "KERAS_BACKEND=$KERAS_BACKEND PYTHONPATH=$PYTHONPATH JAX_DEFAULT_MATMUL_PRECISION=$JAX_DEFAULT_MATMUL_PRECISION CONVREWRITE_CACHE=$CONVREWRITE_CACHE"
step "a. nvidia-smi" 30 nvidia-smi
step "a. device" 120 python3 -c "
import jax, keras, convrewrite
print('jax', jax.__version__, 'devices', jax.devices(), '| keras', keras.__version__, keras.backend.backend())
fp = convrewrite.fingerprint()
print('device:', convrewrite.device.describe(fp))
print('slug:', convrewrite.device.slug(fp), '| fingerprint id:', convrewrite.device.fingerprint_id(fp))
"

# ---- b. tests (no TensorFlow on the GPU image: the test files that do not import it) ---------------
# (verification and graph tests first; test_pac_oracle.py's 74 cases last)
TESTS="tests/test_verify.py tests/test_graph.py tests/test_sublayers.py tests/test_precision.py tests/test_pac_oracle.py"
if [ "$DRY" = 1 ]; then
    step "b. tests (dry: collected only)" 120 python3 -m pytest -qq -p no:cacheprovider --collect-only $TESTS
else
    # SIGINT at 110 s: pytest stops as on Ctrl-C and still prints its summary of what ran and failed
    step "b. tests" 125 timeout -s INT 110 env CONVREWRITE_ALL_BACKENDS_FULL=1 python3 -m pytest -q -p no:cacheprovider -rfE $TESTS
fi

# ---- c. profile -------------------------------------------------------------------------------------
PROFILE="$OUT/profile.json"
COST_MODELS="cost_models"
if [ "$DRY" = 1 ]; then
    COST_MODELS="$OUT/cost_models"  # a check: leave the repository's cost_models/ alone
    step "c. profile (dry: 1 spec)" 180 python3 benchmarks/gpu_profile.py -o "$PROFILE" --max-specs 1
else
    # `convrewrite profile --quick` (the CLI) writes nothing unless its whole grid is done; gpu_profile.py
    # times the same grid in a random order until its budget is spent, then the canaries, and saves
    step "c. profile" 195 python3 benchmarks/gpu_profile.py -o "$PROFILE" --budget 165
fi
if [ -s "$PROFILE" ]; then
    # the name convrewrite gives this device's profile: convrewrite.device.slug of the profile's fingerprint
    SLUG="$(timeout 60 python3 -c "
import json, sys, convrewrite
print(convrewrite.device.slug(json.load(open(sys.argv[1]))['fingerprint']))" "$PROFILE" 2>> "$LOG" | tail -1)"
    if [ -n "$SLUG" ]; then
        mkdir -p "$COST_MODELS" && cp "$PROFILE" "$COST_MODELS/$SLUG.json"
        cp "$PROFILE" "$OUT/$SLUG.json"
        log "profile: $PROFILE, also $COST_MODELS/$SLUG.json and $OUT/$SLUG.json"
    fi
    COST_MODEL="$PROFILE"
else
    log "no profile was written: models.py plans with the rule-based chooser (--cost-model rules)"
    COST_MODEL=rules
fi

# ---- d. benchmarks ----------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    bench "fft_vs_direct.py" 120 python3 benchmarks/fft_vs_direct.py --quick --sizes 3 --reps 1
    bench "models.py" 150 python3 benchmarks/models.py restoration --batch 1 --repeats 1 --cost-model "$COST_MODEL"
    bench "pac.py" 120 python3 benchmarks/pac.py --quick --repeats 1 --no-memory
else
    bench "fft_vs_direct.py" 60 python3 benchmarks/fft_vs_direct.py --quick
    bench "models.py" 90 python3 benchmarks/models.py restoration large_kernel mobilenet_v2 convnext_tiny \
        --repeats 3 --cost-model "$COST_MODEL"
    bench "pac.py" 40 python3 benchmarks/pac.py --quick --no-memory
fi

log "gpu.sh end $(date -u +%FT%TZ), ${SECONDS}s in all"
ls -l "$OUT" | tee -a "$LOG"

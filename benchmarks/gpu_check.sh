#!/usr/bin/env bash
# The GPU check (docs/PERFORMANCE.md, "GPU"): on a fresh machine with an NVIDIA GPU and this
# repository, install CUDA jax, print the devices, then measure, each part under a time limit and
# writing its JSON under $OUT:
#   leq_step.json           one LEQ step at the paper's AntMaze sizes, the default path: ms per
#                           step, actor/critic parts, expansion, compile time
#   pipeline.json           a real pipeline slice on pointmaze-umaze, every stage shrunk: seconds
#                           of each stage, LEQ steps/s, final success (a broken GPU path shows)
#   world_model_epoch.json  one world-model epoch over 1M transitions
#   many_seeds.json         --num-seeds N = 1, 2, 4, 8, 16: ms per step and t(N)/t(1) (N = 1: the
#                           default single-seed path, whose compiled program leq_step left in the cache)
#   plain_vs_kept.json      the LEQ step and a world-model minibatch with the two formulations the
#                           code keeps because they are faster on a CPU (picked_forward, the members'
#                           loop) against their plain forms, on this device
#   summary.json            all of them merged, with the goals; also printed as a table
#   gpu_check.log           everything printed
# The parts share one time budget (default 440 s: under 8 minutes in all on one H200, the install
# included); a part stopped by its limit keeps what it had measured, and the next one runs.
# Usage:
#   bash benchmarks/gpu_check.sh                  # GPU: .venv-gpu from requirements-gpu.txt (made if missing)
#   bash benchmarks/gpu_check.sh --cpu            # the same parts at small sizes on the CPU (.venv), ~3 min
#   bash benchmarks/gpu_check.sh --python .venv/bin/python --cpu   # an existing interpreter, no install
#
# Options (and environment variables):
#   --cpu (GPU_CHECK_CPU=1)         CPU mode: JAX_PLATFORMS=cpu, small sizes and XLA's cheaper CPU
#                                   compilation (GPU_CHECK_CPU_XLA_FLAGS); a check that the script
#                                   works, whose figures say nothing about a GPU
#   --python PY (GPU_CHECK_PYTHON)  use this interpreter as it is (no venv, no install)
#   --venv DIR (GPU_CHECK_VENV)     the venv to use or make (default .venv-gpu; --cpu: .venv); an
#                                   existing one is used as it is unless --reinstall
#   --reinstall                     pip install into the venv even if it exists
#   --out DIR (OUT)                 where the JSON files go (default: a new temporary folder)
#   --budget S (GPU_CHECK_BUDGET)   seconds for everything (default 440; --cpu: 420)
# Offline machines: pip's own variables work, e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels.
# GPU_CHECK_PLATFORM (default cuda) is the JAX_PLATFORMS of the GPU mode: with it, a jax that
# cannot use the GPU fails at once instead of quietly running on the CPU.
# Exit code: 0 if every part finished, 1 otherwise (summary.json is written in both cases).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

MODE=gpu
[[ "${GPU_CHECK_CPU:-0}" == 1 ]] && MODE=cpu
PY="${GPU_CHECK_PYTHON:-}"
VENV="${GPU_CHECK_VENV:-}"
REINSTALL=0
BUDGET="${GPU_CHECK_BUDGET:-}"
OUT="${OUT:-}"
while (($#)); do
  case "$1" in
    --cpu) MODE=cpu ;;
    --python) PY="$2"; shift ;;
    --venv) VENV="$2"; shift ;;
    --reinstall) REINSTALL=1 ;;
    --out) OUT="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ "$MODE" == gpu ]]; then
  BUDGET="${BUDGET:-440}"; VENV="${VENV:-.venv-gpu}"; REQUIREMENTS=requirements-gpu.txt
  export JAX_PLATFORMS="${GPU_CHECK_PLATFORM:-cuda}"
else
  BUDGET="${BUDGET:-420}"; VENV="${VENV:-.venv}"; REQUIREMENTS=requirements.txt
  export JAX_PLATFORMS=cpu
  # Compiling takes most of the CPU mode's time: XLA's cheaper CPU compilation (about 25% less CPU
  # time here, slower code). GPU_CHECK_CPU_XLA_FLAGS= (empty) keeps the usual compiler settings.
  export XLA_FLAGS="${XLA_FLAGS:-} ${GPU_CHECK_CPU_XLA_FLAGS---xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true}"
fi
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d -t gpu_check_work.XXXXXX)"  # datasets, models, runs: not under $OUT (only the JSON comes back)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
# A compilation cache of this run only (a user's own cache would hide compile times): the
# program leq_step.py compiles first is many_seeds.py's N = 1 (plain), which then loads it.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}" \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$SECONDS
: > "$WORK/parts.txt"
echo "[gpu_check] mode $MODE, budget ${BUDGET} s, JSON in $OUT ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"

# run_part NAME CAP_S COMMAND...: COMMAND under `timeout`, limited to CAP_S and to what is left of
# the budget; one line `NAME status seconds` in parts.txt (ok, timeout, failed-RC or skipped).
run_part() {
  local name="$1" cap="$2" left limit t0 rc status
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "[gpu_check] $name: skipped, the budget is spent"
    echo "$name skipped 0" >> "$WORK/parts.txt"
    return 1
  fi
  echo "[gpu_check] $name (limit ${limit} s): $*"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="failed-$rc" ;;
  esac
  echo "$name $status $((SECONDS - t0))" >> "$WORK/parts.txt"
  echo "[gpu_check] $name: $status after $((SECONDS - t0)) s"
  [[ $status == ok ]]
}

finish() {
  local spy="$PY"
  "$spy" -c 'import json' 2>/dev/null || spy=python3
  "$spy" benchmarks/gpu_check.py summary --mode "$MODE" --out "$OUT" --parts "$WORK/parts.txt" \
    --devices "$WORK/devices.json" --budget "$BUDGET" --wall $((SECONDS - START))
  if grep -qv ' ok ' "$WORK/parts.txt"; then
    echo "[gpu_check] not every part finished (see above); $((SECONDS - START)) s"
    exit 1
  fi
  echo "[gpu_check] done in $((SECONDS - START)) s"
  exit 0
}

# --- 1. Install (skipped with --python, or when the venv exists) ------------------------------
if [[ -z "$PY" ]]; then
  PY="$VENV/bin/python"
  if [[ -x "$PY" && $REINSTALL == 0 ]]; then
    echo "[gpu_check] using the existing $VENV (--reinstall to pip install into it)"
  else
    BASE="$(command -v python3.11 || command -v python3)"  # requirements*.txt are pinned for Python 3.11
    run_part install 180 bash -c "{ [[ -x '$PY' ]] || '$BASE' -m venv '$VENV'; } &&
      '$PY' -m pip install --quiet --upgrade pip && '$PY' -m pip install --quiet -r $REQUIREMENTS" || finish
  fi
fi

# --- 2. Devices ---------------------------------------------------------------------------------
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
run_part devices 90 "$PY" -c '
import json, os, sys
import jax
print(jax.devices())
info = {"devices": [str(d) for d in jax.devices()], "kind": jax.devices()[0].device_kind,
        "platform": jax.default_backend(), "jax": jax.__version__, "jax_pinned": jax.__version__ == "0.10.2",
        "python": sys.version.split()[0], "cpu_count": os.cpu_count(), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS")}
print(json.dumps(info))
json.dump(info, open(sys.argv[1], "w"), indent=2)
' "$WORK/devices.json" || { echo "[gpu_check] jax cannot use the $JAX_PLATFORMS platform: stopping here"; finish; }

# --- 3. The measurements, most telling first ----------------------------------------------------
if [[ "$MODE" == gpu ]]; then
  SIZES=()  # the paper's AntMaze sizes (the scripts' defaults)
  STEP=(--steps-per-call 100 --calls 5)
  EPOCH=(--transitions 1000000 --epochs 3)
  SEEDS=(--seeds 2 4 8 16 --steps-per-call 100 --calls 3 --start-rows 1000000)  # N = 1: the plain chunk
  KEPT=(--rounds 5 --leq-steps 100 --epoch-minibatches 200)
  CAPS=(90 100 60 150 400)  # leq_step, pipeline, world-model epoch, plain vs kept, many seeds (the rest)
else
  SIZES=(--dataset-size 5000 --horizon 3 --batch-size 32 --hidden 32 --model-hidden 32 --expand-size 1000)
  STEP=(--steps-per-call 5 --calls 2)
  EPOCH=(--transitions 10000 --epochs 2)
  SEEDS=(--seeds 2 --steps-per-call 5 --calls 2 --start-rows 5000)
  KEPT=(--small --rounds 2 --leq-steps 2 --epoch-minibatches 2)
  CAPS=(150 150 90 150 150)  # the same order
fi
run_part leq_step "${CAPS[0]}" "$PY" benchmarks/leq_step.py --no-jacobian "${STEP[@]}" "${SIZES[@]}" \
  --out "$OUT/leq_step.json"
run_part pipeline "${CAPS[1]}" "$PY" benchmarks/gpu_check.py pipeline --mode "$MODE" --work "$WORK/pipeline" \
  --out "$OUT/pipeline.json"
run_part world_model_epoch "${CAPS[2]}" "$PY" benchmarks/world_model_epoch.py "${EPOCH[@]}" \
  --out "$OUT/world_model_epoch.json"
# The two CPU-measured formulations the stage files keep (world_model.picked_forward and the
# members' loop in ensemble_forward) against their plain forms on this device: the figure that
# says whether the GPU wants the plain ones. LEQ step: "all plain" (every_member_then_pick over a
# vmap of the members) and "kept -picked" (every_member_then_pick over the loop); world-model
# minibatch: "all plain" (the vmap; "kept -ens_fwd" would compile the same program).
run_part plain_vs_kept "${CAPS[3]}" "$PY" benchmarks/plain_vs_tuned.py --base "module (after)" \
  --variants "all plain" "kept -picked" "${KEPT[@]}" --out "$OUT/plain_vs_kept.json"
run_part many_seeds "${CAPS[4]}" "$PY" benchmarks/many_seeds.py "${SEEDS[@]}" "${SIZES[@]}" \
  --out "$OUT/many_seeds.json"
finish

#!/usr/bin/env bash
# Install the OPTIONAL D4RL stack (d4rl 1.1, gym 0.23.1, mujoco-py 2.1 + MuJoCo 2.1
# binaries) into a Python virtualenv, on top of the project's main requirements.
# Needs only package registries (apt, PyPI): the MuJoCo 2.1 binaries are taken from
# the PyPI wheel of free-mujoco-py, which ships them.
#
# Usage:  scripts/install_d4rl.sh [VENV_DIR]
#
# VENV_DIR (first argument) is created if it does not exist yet.  If omitted:
# $D4RL_VENV, else the active venv ($VIRTUAL_ENV), else <repo>/.venv.
#
# Optional environment variables:
#   PYTHON             interpreter used to create a new venv (default: python3.11, else python3)
#   MUJOCO_DIR         where to put MuJoCo 2.1 (default: $MUJOCO_PY_MUJOCO_PATH, else
#                      ~/.mujoco/mujoco210, which is where mujoco-py looks by default)
#   MAIN_REQUIREMENTS  main requirements file installed together with the extra
#                      (default: <repo>/requirements.txt if it exists; "none" to skip)
#   SKIP_APT=1         never call apt-get
#   D4RL_SMOKE_TEST=0  skip the final "make an env and step it" check
#
# Safe to run again: every step checks whether its work is already done.
# On success it writes <venv>/d4rl-env.sh; `source` it (after activating the venv)
# in every shell that uses d4rl, because LD_LIBRARY_PATH must be set before Python
# starts.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRA_REQUIREMENTS="$REPO_DIR/requirements-d4rl.txt"
D4RL_SPEC="d4rl==1.1"                 # installed with --no-deps, see requirements-d4rl.txt
FREE_MUJOCO_PY_SPEC="free-mujoco-py==2.1.6"
FREE_MUJOCO_PY_SHA256="f541d84b6bd87919ccf28f5a708681ca90560a945d104aca393d89275790efb8"
# Debian packages: OSMesa headers/lib + libGL for linking mujoco-py's extension,
# patchelf (mujoco-py rewrites the built .so with it), a C compiler.
APT_PACKAGES=(libosmesa6-dev libgl1-mesa-dev patchelf build-essential)

log()  { printf '\033[1m[install_d4rl]\033[0m %s\n' "$*"; }
die()  { printf '\033[1;31m[install_d4rl] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO (exit code $?)"' ERR

# ---------------------------------------------------------------- arguments
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) die "unknown option $1; scripts/install_d4rl.sh --help shows the usage" ;;
esac
[[ $# -le 1 ]] || die "one argument at most (the venv folder); scripts/install_d4rl.sh --help shows the usage"
VENV_DIR="${1:-${D4RL_VENV:-${VIRTUAL_ENV:-$REPO_DIR/.venv}}}"
VENV_DIR="$(realpath -m "$VENV_DIR")"
MUJOCO_DIR="${MUJOCO_DIR:-${MUJOCO_PY_MUJOCO_PATH:-$HOME/.mujoco/mujoco210}}"
MUJOCO_DIR="$(realpath -m "$MUJOCO_DIR")"   # mujoco-py wants an absolute path
MAIN_REQUIREMENTS="${MAIN_REQUIREMENTS:-$REPO_DIR/requirements.txt}"
[[ -f "$EXTRA_REQUIREMENTS" ]] || die "missing $EXTRA_REQUIREMENTS"

START_TIME=$SECONDS
log "venv:   $VENV_DIR"
log "MuJoCo: $MUJOCO_DIR"

# ---------------------------------------------------------------- 1. apt packages
missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if [[ "${SKIP_APT:-0}" == 1 ]]; then
  log "SKIP_APT=1: not installing apt packages (${APT_PACKAGES[*]})"
elif ! command -v apt-get >/dev/null; then
  log "no apt-get: install the equivalents of '${APT_PACKAGES[*]}' yourself"
elif [[ ${#missing[@]} -eq 0 ]]; then
  log "apt packages already installed: ${APT_PACKAGES[*]}"
elif [[ $(id -u) -ne 0 ]]; then
  log "not root: skipping apt. Please run: sudo apt-get install -y ${missing[*]}"
else
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Check what the mujoco-py build really needs, so we fail early with a clear message.
command -v gcc >/dev/null      || die "gcc not found (Debian: apt-get install build-essential)"
command -v patchelf >/dev/null || die "patchelf not found (Debian: apt-get install patchelf)"
echo '#include <GL/osmesa.h>' | gcc -E -x c - >/dev/null 2>&1 \
  || die "GL/osmesa.h not found (Debian: apt-get install libosmesa6-dev)"

# ---------------------------------------------------------------- 2. venv
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
  PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  log "creating venv with $PYTHON"
  "$PYTHON" -m venv "$VENV_DIR" || die "could not create venv (Debian: apt-get install python3-venv)"
fi
VPY="$VENV_DIR/bin/python"
PYVER="$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$PYVER" == 3.11 ]] || log "warning: tested with Python 3.11 only, this venv has Python $PYVER"
"$VPY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || die "Python.h not found for $VPY (Debian system Python: apt-get install python3-dev)"

# ---------------------------------------------------------------- 3. pip packages
req_args=()
if [[ "$MAIN_REQUIREMENTS" != none && -f "$MAIN_REQUIREMENTS" ]]; then
  req_args+=(-r "$MAIN_REQUIREMENTS")      # one resolver run for main + extra
else
  log "no main requirements file ($MAIN_REQUIREMENTS): installing only the extra"
fi
req_args+=(-r "$EXTRA_REQUIREMENTS")
log "pip install ${req_args[*]}"
"$VPY" -m pip install "${req_args[@]}"
log "pip install --no-deps $D4RL_SPEC"
"$VPY" -m pip install --no-deps "$D4RL_SPEC"

# ---------------------------------------------------------------- 4. MuJoCo 2.1 binaries
if [[ -f "$MUJOCO_DIR/bin/libmujoco210.so" ]]; then
  log "MuJoCo 2.1 already present in $MUJOCO_DIR"
else
  log "fetching MuJoCo 2.1 binaries from the $FREE_MUJOCO_PY_SPEC wheel"
  tmp="$(mktemp -d)"
  # The wheel declares Python < 3.11, hence --python-version; we only unzip it.
  "$VPY" -m pip download --no-deps --python-version 3.10 --only-binary=:all: \
    -d "$tmp" "$FREE_MUJOCO_PY_SPEC"
  whl="$(ls "$tmp"/free_mujoco_py-*.whl)"
  echo "$FREE_MUJOCO_PY_SHA256  $whl" | sha256sum -c --quiet - || die "checksum mismatch for $whl"
  mkdir -p "$(dirname "$MUJOCO_DIR")"
  # Extract mujoco_py/binaries/linux/mujoco210/ (keeping file modes) into a temp
  # folder next to the target, then move it into place in one step.
  "$VPY" - "$whl" "$MUJOCO_DIR.partial" <<'PY'
import os, shutil, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
prefix = "mujoco_py/binaries/linux/mujoco210/"
shutil.rmtree(dest, ignore_errors=True)
with zipfile.ZipFile(whl) as zf:
    members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
    if not members:
        sys.exit("no %s in %s" % (prefix, whl))
    for m in members:
        target = os.path.join(dest, m.filename[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(m) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        mode = (m.external_attr >> 16) & 0o777
        os.chmod(target, mode or 0o644)
print("extracted %d files" % len(members))
PY
  rm -rf "$MUJOCO_DIR"
  mv "$MUJOCO_DIR.partial" "$MUJOCO_DIR"
  rm -rf "$tmp"
fi

# ---------------------------------------------------------------- 5. env snippet
ENV_FILE="$VENV_DIR/d4rl-env.sh"
cat > "$ENV_FILE" <<EOF
# Written by scripts/install_d4rl.sh. Source it before running Python with d4rl.
export MUJOCO_PY_MUJOCO_PATH="$MUJOCO_DIR"
case ":\${LD_LIBRARY_PATH:-}:" in
  *":$MUJOCO_DIR/bin:"*) ;;
  *) export LD_LIBRARY_PATH="\${LD_LIBRARY_PATH:+\$LD_LIBRARY_PATH:}$MUJOCO_DIR/bin" ;;
esac
# Hide d4rl's "<suite> failed to import" messages about suites we do not install
# (mjrl, flow, dm_control, carla, pybullet). AntMaze / MuJoCo locomotion are unaffected.
export D4RL_SUPPRESS_IMPORT_ERROR=1
# Datasets are looked up as \$D4RL_DATASET_DIR/<basename of the dataset URL>
# (default ~/.d4rl/datasets); uncomment to change:
# export D4RL_DATASET_DIR="\$HOME/.d4rl/datasets"
EOF
# shellcheck disable=SC1090
source "$ENV_FILE"

# ---------------------------------------------------------------- 6. build + smoke test
# The first `import mujoco_py` compiles its Cython extension (about a minute) into
# the venv's site-packages/mujoco_py/generated/; later imports reuse it.
log "building / loading mujoco-py's extension (first time takes ~1 min)"
"$VPY" -c 'import mujoco_py; print("mujoco_py", mujoco_py.__version__, "OK")'

if [[ "${D4RL_SMOKE_TEST:-1}" != 0 ]]; then
  log "smoke test: hopper-medium-v2 and antmaze-umaze-v2"
  "$VPY" - <<'PY'
import warnings
import gym
import d4rl.locomotion, d4rl.gym_mujoco  # registers antmaze-* and hopper-* etc.
warnings.filterwarnings("ignore")  # after the imports: gym's logger resets the filters
for name in ["hopper-medium-v2", "antmaze-umaze-v2"]:
    env = gym.make(name)
    obs = env.reset()
    obs, reward, done, info = env.step(env.action_space.sample())
    print("%s: obs %s, reward %.3f -> OK" % (name, obs.shape, reward))
PY
fi

trap - ERR
log "done in $((SECONDS - START_TIME)) s"
cat <<EOF

To use d4rl, in each new shell run:
    source "$VENV_DIR/bin/activate"
    source "$ENV_FILE"
(or export these yourself: MUJOCO_PY_MUJOCO_PATH=$MUJOCO_DIR
 and LD_LIBRARY_PATH=\$LD_LIBRARY_PATH:$MUJOCO_DIR/bin)
In Python, import d4rl.locomotion and d4rl.gym_mujoco explicitly: a plain
\`import d4rl\` does not register the gym_mujoco (hopper/walker/...) envs
because the optional 'mjrl' package is missing.
EOF

#!/usr/bin/env bash
# Creates .venv/ with the pinned dependencies and a Horovod build (Gloo, MXNet) checked by
# `horovodrun --check-build`. Idempotent: when the stamp matches, it only re-checks imports.
#   tools/setup_env.sh          CPU build (mxnet==1.9.1)
#   GPU=1 tools/setup_env.sh    CUDA build (mxnet-cu112 + nvidia-*-cu11 wheels, Horovod with NCCL)
#   tools/setup_env.sh --find-python    print the Python a new .venv would be made with, and stop
# The venv is made with $PYTHON when set, else with the newest of python3.11, python3.10, python3.9, python3.8
# (then python3) on PATH that is Python 3.8-3.11 and can make a venv: mxnet 1.9.1 has wheels for no other.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU:-0}
VENV=.venv
HOROVOD_VERSION=0.28.1
REQ=requirements.txt
[ "$GPU" = "1" ] && REQ=requirements-gpu.txt

die() { echo "setup: ERROR: $*" >&2; exit 1; }
say() { echo "setup: $*"; }

# One question to each candidate interpreter: "X.Y venv" (or "X.Y no-venv" when ensurepip is missing, as in
# Debian's python3.X without python3.X-venv).
PROBE='import sys
try:
    import ensurepip, venv
    can = "venv"
except ImportError:
    can = "no-venv"
print("%d.%d %s" % (sys.version_info[0], sys.version_info[1], can))'
NOTES=""
probe() { "$1" -c "$PROBE" 2>/dev/null || true; }
supported() { case "$1" in 3.8|3.9|3.10|3.11) return 0 ;; esac; return 1; }
usable() {   # usable CMD: Python 3.8-3.11 that can make a venv? Sets PY_VERSION; adds why not to NOTES
  local answer
  answer=$(probe "$1")
  PY_VERSION=${answer% *}
  if [ -z "$answer" ]; then NOTES+="  $1 does not run"$'\n'
  elif ! supported "$PY_VERSION"; then NOTES+="  $1 is Python $PY_VERSION"$'\n'
  elif [ "${answer#* }" != venv ]; then
    NOTES+="  $1 is Python $PY_VERSION without venv/ensurepip"
    NOTES+=" (Debian/Ubuntu: sudo apt-get install python$PY_VERSION-venv)"$'\n'
  else return 0
  fi
  return 1
}
find_python() {   # sets PY, or stops with the commands that get a usable Python
  if [ -n "${PYTHON:-}" ]; then
    usable "$PYTHON" || die "PYTHON=$PYTHON cannot make the venv:
${NOTES}mxnet 1.9.1 needs Python 3.8-3.11: point PYTHON at one, or unset it to look on PATH"
    PY=$PYTHON
    say "using PYTHON=$PY (Python $PY_VERSION)"
    return
  fi
  local name
  for name in python3.11 python3.10 python3.9 python3.8 python3; do
    command -v "$name" >/dev/null 2>&1 || continue
    if usable "$name"; then
      PY=$(command -v "$name")
      say "using $PY (Python $PY_VERSION, the newest usable of python3.11 .. python3.8, python3 on PATH)"
      return
    fi
  done
  die "no usable Python 3.8-3.11 on PATH (mxnet 1.9.1 has wheels for no other):
${NOTES:-  none of python3.11, python3.10, python3.9, python3.8, python3 is on PATH
}Get Python 3.11, then run make setup again:
  Debian/Ubuntu:      sudo apt-get install python3.11 python3.11-venv
                      (apt has no python3.11, e.g. Ubuntu 24.04? first:
                       sudo add-apt-repository ppa:deadsnakes/ppa && sudo apt-get update)
  Fedora/RHEL:        sudo dnf install python3.11
  any Linux, no root: uv python install 3.11      (uv itself: curl -LsSf https://astral.sh/uv/install.sh | sh)
                      then: PYTHON=\$(uv python find 3.11) make setup"
}
if [ "${1:-}" = "--find-python" ]; then
  find_python
  echo "$PY"
  exit 0
fi

stamp_of() { cat "$REQ" "$0" | sha256sum | cut -c1-16; echo "gpu=$GPU horovod=$HOROVOD_VERSION"; }
STAMP_FILE=$VENV/.setup-stamp
IMPORT_CHECK="import mxnet, numpy, cv2, easydict, sklearn, tqdm, pytest, matplotlib, numba, onnx, onnxruntime, horovod.mxnet"

if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$(stamp_of)" ] \
   && "$VENV/bin/python" -c "$IMPORT_CHECK" 2>/dev/null; then
  say "environment up to date ($VENV, $REQ)"
  exit 0
fi

if [ -x "$VENV/bin/python" ]; then
  VENV_VERSION=$(probe "$VENV/bin/python")
  VENV_VERSION=${VENV_VERSION% *}
  supported "$VENV_VERSION" || die "$VENV/bin/python is not Python 3.8-3.11 (${VENV_VERSION:+it is }${VENV_VERSION:-it \
does not run}): remove $VENV (rm -rf $VENV) and run make setup again"
else
  find_python
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"
say "installing $REQ"
$PIP install -q -r "$REQ"

if [ "$GPU" = "1" ]; then
  # The nvidia-*-cu11 wheels put their .so files under site-packages/nvidia/*/lib; mxnet-cu112 and
  # Horovod's NCCL ops dlopen them by soname, so they must be on LD_LIBRARY_PATH at process start.
  NV=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]) + "/nvidia")')
  LIBS=$(ls -d "$NV"/*/lib | paste -sd: -)
  if ! grep -q "partial-fc cuda libs" "$VENV/bin/activate"; then
    printf '\n# partial-fc cuda libs\nexport LD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' "$LIBS" >> "$VENV/bin/activate"
  fi
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$NV/nccl"
  export HOROVOD_CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$HOROVOD_CUDA_HOME/bin/nvcc" ] || die "GPU=1 builds Horovod's CUDA ops and needs nvcc: set CUDA_HOME (now $HOROVOD_CUDA_HOME)"
fi

if ! "$VENV/bin/python" -c 'import horovod, horovod.mxnet; assert horovod.__version__ == "'$HOROVOD_VERSION'"' 2>/dev/null; then
  say "building horovod==$HOROVOD_VERSION against mxnet (about 3 minutes on 2 cores; pip caches the wheel)"
  export PATH="$PWD/$VENV/bin:$PATH"
  HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
  HOROVOD_WITHOUT_MPI=1 $PIP install -q --no-build-isolation "horovod==$HOROVOD_VERSION" \
    || die "horovod build failed (needs gcc/g++, cmake<4 and mxnet installed first; see the output above)"
fi

CHECK=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $CHECK"
echo "$CHECK" | grep -q '\[X\] MXNet' || die "horovod was built without MXNet support:
$CHECK
Remove it ($PIP uninstall horovod) and run the set-up again after mxnet imports."
echo "$CHECK" | grep -q '\[X\] Gloo' || die "horovod was built without Gloo:
$CHECK"
"$VENV/bin/python" -c "$IMPORT_CHECK" || die "an installed package does not import (see above)"
stamp_of > "$STAMP_FILE"
say "ready: $("$VENV/bin/python" -c 'import mxnet, horovod, numpy; print("mxnet", mxnet.__version__, "| horovod", horovod.__version__, "| numpy", numpy.__version__)')"

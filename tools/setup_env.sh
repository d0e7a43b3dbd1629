#!/usr/bin/env bash
# Creates .venv/ with the pinned dependencies and a Horovod build (Gloo, MXNet) checked by
# `horovodrun --check-build`. Idempotent: when the stamp matches, it only re-checks imports.
#   tools/setup_env.sh          CPU build (mxnet==1.9.1)
#   GPU=1 tools/setup_env.sh    CUDA build (mxnet-cu112 + nvidia-*-cu11 wheels, Horovod with NCCL)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU=${GPU:-0}
VENV=.venv
HOROVOD_VERSION=0.28.1
REQ=requirements.txt
[ "$GPU" = "1" ] && REQ=requirements-gpu.txt

die() { echo "setup: ERROR: $*" >&2; exit 1; }
say() { echo "setup: $*"; }

stamp_of() { cat "$REQ" "$0" | sha256sum | cut -c1-16; echo "gpu=$GPU horovod=$HOROVOD_VERSION"; }
STAMP_FILE=$VENV/.setup-stamp
IMPORT_CHECK="import mxnet, numpy, cv2, easydict, sklearn, tqdm, pytest, matplotlib, numba, onnx, onnxruntime, horovod.mxnet"

if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$(stamp_of)" ] \
   && "$VENV/bin/python" -c "$IMPORT_CHECK" 2>/dev/null; then
  say "environment up to date ($VENV, $REQ)"
  exit 0
fi

"$PYTHON" -c 'import sys; assert (3, 8) <= sys.version_info[:2] <= (3, 11), sys.version' \
  || die "$PYTHON is not Python 3.8-3.11 (mxnet 1.9.1 wheels); set PYTHON=/path/to/python3.11"
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
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

#!/usr/bin/env bash
# Install the mmdet (Mask2Former) GenEval backend into a Python environment that has torch.
# mmcv 2.1.0 ships no wheel for recent torch, so its ops are compiled from source once (about
# 13 minutes on 2 CPU cores, longer with CUDA ops) and the wheel is cached, keyed by the Python
# and torch versions it was built against: a later run, or another venv, reinstalls in seconds.
#
#   PYTHON=.venv/bin/python bash rewards/geneval/install_mmdet.sh
#   SOAR_RAY_WHEEL_CACHE=/some/dir ...   # cache folder (default ~/.cache/soar_ray/wheels)
set -euo pipefail

PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install_mmdet.sh: $PYTHON has no torch; install torch first (make test does)" >&2
    exit 1
fi
TAG="$("$PYTHON" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')"
WHEELS="${SOAR_RAY_WHEEL_CACHE:-$HOME/.cache/soar_ray/wheels}/$TAG"
mkdir -p "$WHEELS"

# The darknet reader of the yolo backend needs OpenCV < 5; mmcv/mmengine must not upgrade it.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'opencv-python<5\nopencv-python-headless<5\n' > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"

# mmcv's setup.py imports pkg_resources (gone from setuptools 82) and compiles against the
# installed torch, hence the pinned setuptools and --no-build-isolation.
"$PYTHON" -m pip install "setuptools<82" wheel ninja packaging
if ! compgen -G "$WHEELS/mmcv-2.1.0-*.whl" > /dev/null; then
    echo "install_mmdet.sh: building mmcv 2.1.0 into $WHEELS (takes a while)"
    SRC="$(mktemp -d)"
    trap 'rm -f "$CONSTRAINTS"; rm -rf "$SRC"' EXIT
    "$PYTHON" -m pip download --no-deps --no-build-isolation --no-binary :all: -d "$SRC" \
        "mmcv==2.1.0"
    tar -xzf "$SRC"/mmcv-2.1.0.tar.gz -C "$SRC"
    # mmcv 2.1.0 compiles its ops as C++14/17; torch >= 2.10 headers need C++20.
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$SRC/mmcv-2.1.0/setup.py"
    MMCV_WITH_OPS=1 "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEELS" \
        "$SRC/mmcv-2.1.0"
fi
"$PYTHON" -m pip install "$WHEELS"/mmcv-2.1.0-*.whl "mmengine>=0.10" "mmdet==3.3.0"
"$PYTHON" -c "import mmcv.ops, mmdet; print('mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"

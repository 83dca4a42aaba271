#!/usr/bin/env bash
# The one command on a lent GPU: every figure of bench/gpu_acceptance.py at real size, in under 8 minutes.
#
#   here (pip works):   make gpu-wheelhouse                 -> .wheelhouse/ (git-ignored, ~24 MiB)
#   there:              bash bench/gpu_acceptance.sh [--tiny] [more gpu_acceptance.py options]
#   with the device tool: run(command="bash bench/gpu_acceptance.sh", carry=[".wheelhouse"], timeout_s=540)
#
# The GPU image reaches no registry and lacks some packages (bench/gpu_image.txt). The wheels are installed into
# a temporary site (pip --no-index --no-deps --target) that goes first on PYTHONPATH, so that, e.g., transformers
# 5.24 from the wheels wins over the image's 5.17. The figures: the last line printed (one JSON object), and
# $OUT/gpu_acceptance.json + .log where $OUT is set (the device tool's folder), else .v2m/gpu-acceptance/.
# Environment: PYTHON (default python3), WHEELHOUSE (default .wheelhouse).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
OUT_DIR=${OUT:-.v2m/gpu-acceptance}
mkdir -p "$OUT_DIR"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/v2m-site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT

if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$WHEELHOUSE"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(compgen -G "$WHEELHOUSE/*.whl" | wc -l) wheels from $WHEELHOUSE into $SITE"
else
  echo "no wheels in $WHEELHOUSE/ (make gpu-wheelhouse where pip works): using the packages installed here" >&2
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

# The script keeps to its own budget (400 s at real size) and prints its figures when stopped: this is a backstop.
timeout --signal=TERM 450 $PYTHON bench/gpu_acceptance.py --out "$OUT_DIR/gpu_acceptance.json" "$@" 2>&1 \
  | tee "$OUT_DIR/gpu_acceptance.log"

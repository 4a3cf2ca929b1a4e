#!/usr/bin/env bash
# Device check for a machine with an NVIDIA GPU (no network needed): numerics of the CUDA path and an
# A/B of stock / static-frequency / hybrimoe on DeepSeek-V2-Lite-shaped layers. Writes
# $OUT/device_check.json (results/ when OUT is unset). Extra arguments go to device_check.py
# (e.g. --dry-run to run on the CPU stand-in).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"
mkdir -p "$OUT"
if ! python -c "import hybrimoe_kt.kernels" >/dev/null 2>&1; then
    # editable install without build isolation (no network); device_check.py imports the installed
    # package only, so it stops with one line if this fails
    pip install --no-deps --no-build-isolation -e . >"$OUT/device_check_pip.log" 2>&1 \
        || echo "pip install failed (see $OUT/device_check_pip.log)"
fi
exec timeout 470 python scripts/device_check.py --out "$OUT" "$@"

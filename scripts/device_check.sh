#!/usr/bin/env bash
# Device check for a machine with one NVIDIA GPU (no network needed), under 8 minutes: sections env,
# numerics (the GPU expert kernels vs fp32 references), chat (a tiny model of every family, stock and
# hybrimoe rules with generate_device cuda, decoded eagerly and through the captured CUDA graph) and ab
# (DeepSeek-V2-Lite-shaped layers, stock / static-frequency / hybrimoe at 25 and 50% cache, decode with
# the graph off and on: tok/s and host time per layer). Writes $OUT/device_check.json (results/ when OUT
# is unset), rewritten after every section, chat family and A/B run, so the outer timeout below (above
# device_check.py's own 420 s budget) still leaves what was measured. Extra arguments go to
# device_check.py (e.g. --dry-run to run on the CPU stand-in).
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

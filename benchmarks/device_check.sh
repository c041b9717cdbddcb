#!/usr/bin/env bash
# The prepared GPU check for issue #6, for a session lent the device machine (15 minutes in all).
# Call it through the device tool from the repository root, with nothing carried:
#     run(command="bash benchmarks/device_check.sh", timeout_s=580)
# then copy $OUT/benchmarks.json into results/ and re-render (docs/speed.md), and give the machine back.
# Timing runs on a bottle-sized stand-in (209 training / 84 test images at 512 px, generated there in
# seconds) and the paper's ViT-S/16 architecture with random weights: step times do not depend on the
# weights or the image content, and neither the real images nor the offline weights fit the 64 MiB
# that travels. The machine's own python3 already has torch, torchvision, timm, OpenCV, scikit-learn,
# scikit-image, pandas and tqdm; apmask_lib is used from the working tree (PYTHONPATH), not installed.
# DEVICE=cpu SIZE=tiny runs the same script here as a dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/apmask_device_out}"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"; SIZE="${SIZE:-full}"; PY="${PY:-python3}"
BACKBONE="${BACKBONE:-random:vit_s16}"; [ "$SIZE" = tiny ] && BACKBONE=random:vit_tiny16
E2E="${E2E:-0}"   # 1: also run the whole 300 + 100-epoch schedule (a second call, if time is left)
start=$(date +%s)
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  $PY -c "import torch, torchvision, timm, cv2; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cv2', cv2.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
common=(--device "$DEVICE" --size "$SIZE" --backbone "$BACKBONE" --data demo-bottle-sized --results "$OUT/benchmarks.json")
if [ "$E2E" = 1 ]; then
  timeout 540 $PY -m benchmarks.speed "${common[@]}" --compile "${COMPILE:-none}" --e2e 2>&1 | tee "$OUT/speed_e2e.log"
else
  timeout 220 $PY -m benchmarks.speed "${common[@]}" --compile none --rank-image 2>&1 | tee "$OUT/speed_none.log"
  timeout 300 $PY -m benchmarks.speed "${common[@]}" --compile "${COMPILE:-reduce-overhead}" 2>&1 | tee "$OUT/speed_compiled.log"
fi
echo "device_check: $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# The prepared check for a lent GPU machine: installs what that machine lacks from wheels
# carried with the run, checks the GPU's logits against the CPU's, times the paper's model
# and writes OUT/device_table.md (OUT is the device tool's output folder, else device_out).
#
#   tools/fetch_device_wheels.sh          # here, once: wheels into .device_wheels/ (ignored)
#   tools/device_check.sh                 # there, as the device tool's command, carrying
#                                         # .device_wheels; exit status 1 if the logits differ
#   DEVICE_CHECK_SMOKE=1 tools/device_check.sh   # the same steps on a tiny model, any machine
#
# The benchmark rows (bfloat16, ViT-B/16 CLIP with the CLA head and cache): 224 and 448 px;
# no reduction, EViT 0.1 and ToMe 0.1; inference and training; fused attention, and the
# batched attention for the no-reduction training step. Each folder of OUT holds one call's
# benchmark.csv; the table is written again after every call, so a run cut short still
# returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device_out}
mkdir -p "$out"
python=${PYTHON:-python3}
wheels=.device_wheels
site=${TMPDIR:-/tmp}/clca_device_site

if [ -d "$wheels" ]; then
  # No registry there: the wheels alone, without their dependencies (the machine's jax,
  # flax, optax, orbax, numpy and protobuf stay as they are).
  "$python" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl \
    || { echo "device_check: installing the carried wheels failed" >&2; exit 2; }
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
"$python" - <<'EOF' | tee "$out/versions.txt"
import platform, jax, flax, optax
print("python", platform.python_version(), "| jax", jax.__version__, "| flax", flax.__version__,
      "| optax", optax.__version__, "| devices", jax.devices())
EOF

if [ -n "${DEVICE_CHECK_SMOKE:-}" ]; then
  config=soyglobal:tiny small=32 large=64 batch_small=2 batch_large=2 repeats=1
  smoke=--smoke
else
  config=soyglobal small=224 large=448 batch_small=128 batch_large=32 repeats=5
  smoke=
fi

"$python" tools/device_check.py logits $smoke 2>&1 | tee "$out/logits.txt"
logits_status=${PIPESTATUS[0]}

bench() {  # bench NAME SIZE BATCH ATTENTION METHODS MODES
  "$python" -m clca_jax.benchmark --config="$config" --config.model.dtype=bfloat16 \
    --config.model.img_size="$2" --config.model.attention="$4" --methods="$5" \
    --keep_rates=0.1 --modes="$6" --batch_size="$3" --repeats="$repeats" \
    --out="$out/$1_b$3" --overwrite 2>&1 | tail -n 20
  "$python" tools/device_check.py table "$out" >/dev/null
}

bench "${small}px_fused" "$small" "$batch_small" fused none,evit,tome inference,train
bench "${large}px_fused" "$large" "$batch_large" fused none,evit,tome inference,train
bench "${small}px_batched" "$small" "$batch_small" batched none train
bench "${large}px_batched" "$large" "$batch_large" batched none train
"$python" tools/device_check.py table "$out"
exit "$logits_status"

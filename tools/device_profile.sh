#!/usr/bin/env bash
# A short call on a lent GPU machine (after tools/device_pack.sh), instead of tools/device_run.sh
# where a session has less device time left (15 minutes in all hold one device_run.sh call, not
# both): under LIMIT seconds (default 300),
#   1. the adapter and the cooperative-matrix test;
#   2. the full benchmark with every dispatch of each row timed on its own (--profile) and the
#      PyTorch peer beside the units (no burn: device_run.sh has it);
#   3. the unit, network and batch-norm tests, while time is left.
# Outputs go under $OUT (the device tool brings them back).
set -u
start=$(date +%s)
LIMIT=${LIMIT:-300}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
source .device/vulkan-env.sh
export WGPU_BACKEND=vulkan PYTHONUNBUFFERED=1
for f in .device/*.gz; do
    b=$(basename "$f" .gz); [ "$b" = burn-unit ] && continue
    gunzip -c "$f" > "/tmp/$b" && chmod +x "/tmp/$b"
done
timeout -k 5 30 /tmp/resnet-wgpu info 2>&1 | tee "$OUT/info.txt"
summary() { grep -E "^test result|panicked|skipped" "$1" | head -6; }

timeout 45 /tmp/t_coop --test-threads 2 --nocapture > "$OUT/t_coop.log" 2>&1
coop_rc=$?
echo "test coop exit $coop_rc ($(left) s left)"; summary "$OUT/t_coop.log"
[ $coop_rc -ne 0 ] && export RESNET_WGPU_COOP=0 && echo "cooperative matrices off for the benchmark"

l=$(left); b=$(( l - 60 )); [ $b -gt 200 ] && b=200; [ $b -lt 30 ] && b=30
peers=(); [ -f .device/torch_unit.py ] && peers+=(--torch .device/torch_unit.py)
RESNET_WGPU_CONV_TUNE_LOG=1 timeout $b /tmp/resnet-wgpu bench --full --profile "${peers[@]}" \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "bench exit $? ($(left) s left)"
grep -E "^(conv3x3|bn|unit)|fp32" "$OUT/bench.txt" | head -150

for t in units network batch_norm; do
    l=$(left); [ "$l" -lt 25 ] && { echo "skip test $t: time"; continue; }
    to=$(( l - 10 < 45 ? l - 10 : 45 ))
    timeout $to "/tmp/t_$t" --test-threads 4 > "/tmp/t_$t.log" 2>&1
    echo "test $t exit $? ($(left) s left)"; summary "/tmp/t_$t.log"
    { echo "##### $t"; cat "/tmp/t_$t.log"; } >> "$OUT/tests.log"
done
echo "=== done at $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# One call on a lent GPU machine (after tools/device_pack.sh), in priority order, each step
# time-limited so that the whole stays under LIMIT seconds (default 420):
#   1. the adapter;
#   2. the PyTorch fixture with each conv family x batch-norm kernels (examples/torch_check), and
#      its gradients against the f64 reference with the default, vec4 and wide batch norm (relu_ties);
#   3. the test binaries on the GPU;
#   4. batch norm's vec4 and wide kernels timed (bn rows; the units with the wide ones), against
#      the default (scalar) ones in step 5; the f16 rows with cooperative matrices off
#      (RESNET_WGPU_COOP=0), against step 5's, which use them where the card offers them;
#   5. the full benchmark with the autotuner's log and the burn and PyTorch peers.
# Outputs go under $OUT (the device tool brings them back).
set -u
start=$(date +%s)
LIMIT=${LIMIT:-420}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
source .device/vulkan-env.sh
export WGPU_BACKEND=vulkan PYTHONUNBUFFERED=1
for f in .device/*.gz; do b=$(basename "$f" .gz); gunzip -c "$f" > "/tmp/$b" && chmod +x "/tmp/$b"; done
/tmp/resnet-wgpu info 2>&1 | tee "$OUT/info.txt"
echo "=== torch_check ($(left) s left)"
timeout 90 /tmp/torch_check tests/fixtures/torch-resnet20-original-b 2>&1 | grep -v XDG | tee "$OUT/torch_check.txt"
# ReLU inputs within rounding of zero: the fixture's gradients against the f64 reference with the
# default and the vec4 batch-norm kernels (BENCHMARKS.md, the H200's 3.6e-3).
for a in "" vec4 wide; do timeout 60 /tmp/relu_ties "" $a 2>&1 | grep -v XDG | tee -a "$OUT/relu_ties.txt"; done
for t in conv batch_norm variants network units f16_units coop binding_limit; do
    l=$(left); [ "$l" -lt 150 ] && { echo "skip test $t: time"; continue; }
    timeout 90 "/tmp/t_$t" --test-threads 4 --nocapture > "$OUT/t_$t.log" 2>&1
    echo "test $t exit $? ($(left) s left)"
    grep -E "^test result|panicked|relative L2 error" "$OUT/t_$t.log" | head -4
done
echo "=== batch-norm variants ($(left) s left)"
for v in vec4:bn wide:bn wide:unit coop0:f16; do
    bn=${v%%:*} only=${v##*:}
    l=$(left); [ "$l" -lt 240 ] && { echo "skip $bn $only: time"; continue; }
    [ "$bn" = coop0 ] && export RESNET_WGPU_COOP=0
    RESNET_WGPU_BN=${bn/coop0/} timeout 45 /tmp/resnet-wgpu bench --full --only "$only" \
        --json "$OUT/bench-$bn-$only.json" > "$OUT/bench-$bn-$only.txt" 2>&1
    grep -E "^(bn|unit|conv)" "$OUT/bench-$bn-$only.txt" | sed "s/^/$bn: /"
    unset RESNET_WGPU_COOP
done
echo "=== bench ($(left) s left)"
peers=()
[ -x /tmp/burn-unit ] && peers+=(--burn /tmp/burn-unit)
[ -f .device/torch_unit.py ] && peers+=(--torch .device/torch_unit.py)
l=$(left)
RESNET_WGPU_CONV_TUNE_LOG=1 timeout $(( l > 30 ? l - 10 : 20 )) /tmp/resnet-wgpu bench --full "${peers[@]}" \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "bench exit $?"
grep -E "^(conv3x3|bn|unit)|fp32" "$OUT/bench.txt" | head -80
echo "=== done at $(( $(date +%s) - start )) s"

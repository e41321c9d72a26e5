#!/usr/bin/env bash
# One call on a lent GPU machine (after tools/device_pack.sh), in priority order, each step
# time-limited so that the whole stays under LIMIT seconds (default 450):
#   1. the adapter;
#   2. the cooperative-matrix test (tests/coop.rs): where it fails, the benchmark runs with
#      RESNET_WGPU_COOP=0, so that a broken tensor-core kernel cannot cost the peers' figures;
#   3. the full benchmark with the autotuner's log, each row's dispatches timed (--profile), and the
#      burn and PyTorch peers, without the network rows;
#   4. the ResNet-20 training-step rows, streamed (the default) and with each pass in one
#      submission (RESNET_WGPU_STREAM_CHUNK), and PyTorch's step of the same network
#      (tools/torch_resnet.py bench); the conv rows with no runtime checks in the shaders
#      (RESNET_WGPU_SHADER_CHECKS=none: what naga's clamps on array indices cost against step 3's
#      default); and the f16 rows with cooperative matrices switched the other way (off where
#      step 3 had them on);
#      batch norm's kernels were compared in call 1 of 2026-11-27b (wide is the GPU default);
#   5. the test binaries on the GPU, while time is left (the networks' first: the streamed
#      passes and the f16 network have not run on a GPU yet);
#   6. the PyTorch fixture with each conv family x batch-norm kernels (examples/torch_check), and
#      its gradients against the f64 reference (relu_ties), where time is left.
# Outputs go under $OUT (the device tool brings them back).
set -u
start=$(date +%s)
LIMIT=${LIMIT:-450}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
source .device/vulkan-env.sh
export WGPU_BACKEND=vulkan PYTHONUNBUFFERED=1
for f in .device/*.gz; do b=$(basename "$f" .gz); gunzip -c "$f" > "/tmp/$b" && chmod +x "/tmp/$b"; done
/tmp/resnet-wgpu info 2>&1 | tee "$OUT/info.txt"
summary() { grep -E "^test result|panicked|relative L2 error|skipped" "$1" | head -6; }

echo "=== coop test ($(left) s left)"
timeout 60 /tmp/t_coop --test-threads 2 --nocapture > "$OUT/t_coop.log" 2>&1
coop_rc=$?
echo "test coop exit $coop_rc"; summary "$OUT/t_coop.log"
[ $coop_rc -ne 0 ] && export RESNET_WGPU_COOP=0 && echo "cooperative matrices off for the benchmark"

echo "=== bench ($(left) s left)"
peers=()
[ -x /tmp/burn-unit ] && peers+=(--burn /tmp/burn-unit)
[ -f .device/torch_unit.py ] && peers+=(--torch .device/torch_unit.py)
l=$(left); b=$(( l - 170 )); [ $b -gt 260 ] && b=260; [ $b -lt 60 ] && b=60
RESNET_WGPU_CONV_TUNE_LOG=1 timeout $b /tmp/resnet-wgpu bench --full --profile --skip "train step" "${peers[@]}" \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "bench exit $? ($(left) s left)"
grep -E "^(conv3x3|bn|unit|net)|fp32" "$OUT/bench.txt" | head -130

echo "=== variants ($(left) s left)"
{
    for v in net none:conv coop:f16; do
        l=$(left); [ "$l" -lt 100 ] && { echo "skip $v: time"; continue; }
        case $v in
        none:conv)
            RESNET_WGPU_SHADER_CHECKS=none timeout 60 /tmp/resnet-wgpu bench --full --only conv > /tmp/v.txt 2>&1
            echo "exit $?"; grep -E "^conv" /tmp/v.txt | sed "s/^/checks=none: /" ;;
        net)
            # The ResNet-20 training-step rows (left out of step 3, so that their tuning cannot
            # cost its later rows), streamed as by default, then each pass in one submission.
            timeout 60 /tmp/resnet-wgpu bench --full --only "train step" > /tmp/v.txt 2>&1
            echo "exit $?"; grep -E "^net" /tmp/v.txt | sed "s/^/streamed: /"
            RESNET_WGPU_STREAM_CHUNK=1000000 timeout 50 /tmp/resnet-wgpu bench --full --only "train step" > /tmp/v.txt 2>&1
            echo "exit $?"; grep -E "^net" /tmp/v.txt | sed "s/^/one submission: /"
            # PyTorch's step of the same network at the same batch (fp32 with TF32 off, tf32, fp16).
            if [ -f .device/torch_resnet.py ]; then
                timeout 60 python3 .device/torch_resnet.py bench --n 128 --reps 30 > /tmp/v.txt 2>&1
                echo "exit $?"; grep -E "^\{|Error" /tmp/v.txt | sed "s/^/torch: /"
            fi ;;
        coop:f16)
            # The other setting from step 3's.
            [ $coop_rc -ne 0 ] && c=1 || c=0
            RESNET_WGPU_COOP=$c timeout 60 /tmp/resnet-wgpu bench --full --only f16 > /tmp/v.txt 2>&1
            echo "exit $?"; grep -E "^(conv|unit|net)|cooperative" /tmp/v.txt | sed "s/^/coop=$c: /" ;;
        esac
    done
} > "$OUT/variants.txt" 2>&1
cat "$OUT/variants.txt"

echo "=== tests ($(left) s left)"
for t in network f16_network conv units f16_units variants batch_norm no_subgroups binding_limit; do
    l=$(left); [ "$l" -lt 30 ] && { echo "skip test $t: time"; continue; }
    to=$(( l - 10 < 60 ? l - 10 : 60 ))
    timeout $to "/tmp/t_$t" --test-threads 4 --nocapture > "/tmp/t_$t.log" 2>&1
    echo "test $t exit $? ($(left) s left)"; summary "/tmp/t_$t.log"
    # At most 8 files come back: the test logs go into one.
    { echo "##### $t"; cat "/tmp/t_$t.log"; } >> "$OUT/tests.log"
done

echo "=== torch_check ($(left) s left)"
if [ "$(left)" -ge 60 ]; then
    {
        timeout 60 /tmp/torch_check tests/fixtures/torch-resnet20-original-b 2>&1 | grep -v XDG
        # ReLU inputs within rounding of zero: the fixture's gradients against the f64
        # reference (BENCHMARKS.md, the H200's 3.6e-3 with the vec4 kernels).
        timeout 40 /tmp/relu_ties "" 2>&1 | grep -v XDG
    } > "$OUT/torch_check.txt"
    cat "$OUT/torch_check.txt"
else
    echo "skip torch_check: time"
fi

echo "=== done at $(( $(date +%s) - start )) s"

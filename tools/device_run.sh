#!/usr/bin/env bash
# One call on a lent GPU machine (after tools/device_pack.sh), in priority order, each step
# time-limited so that the whole stays under LIMIT seconds (default 540; run it with the device
# tool's timeout_s at 590):
#   1. the adapter;
#   2. the cooperative-matrix test (tests/coop.rs): where it fails, the benchmark runs with
#      RESNET_WGPU_COOP=0, so that a broken tensor-core kernel cannot cost the peers' figures;
#   2b. the rows the unit target is still open on, first, in case a later step runs out of time:
#      the units at 28x28, 14x14 and 7x7 (where Winograd is the tuner's new candidate) against
#      PyTorch, with the tuner's log (critical.txt);
#   3. the full benchmark with the autotuner's log, each row's dispatches timed (--profile), and the
#      burn and PyTorch peers, without the network rows;
#   4. the plain convolutions at 28x28 and 7x7 with each stage of the tiled kernels' main
#      loop left out in turn (bench --leave-out: where their time goes); the ResNet-20
#      training-step rows (their `networks:` table times each step streamed, as
#      train_step takes it, and in one submission, in turn), and PyTorch's step of the same
#      network (tools/torch_resnet.py bench); the bench's progress lines with them, in case the
#      row's time runs out (in the call of cfa22d4 the first network run did, before any row);
#      then the deep layers' unit rows without Winograd (RESNET_WGPU_CONV_WINOGRAD=off),
#      the data ops' convolutions on the tiled kernels tap-major and channel-major in turn
#      (RESNET_WGPU_CONV_TAPS=on/off: the order since and before 0af70fe), and their conv rows
#      with wgpu's bounds checks back in the tiled modules (RESNET_WGPU_SHADER_CHECKS=all),
#      beside step 3's, where time is left;
#   5. the test binaries on the GPU, while time is left: the f16 network's first (it ran out of
#      time in the cfa22d4 call), then the convolutions' (their every-tile tests build the
#      tiled modules without bounds checks, as the default now does on Vulkan GPUs);
#   6. the PyTorch fixture with each conv family x batch-norm kernels (examples/torch_check), and
#      its gradients against the f64 reference (relu_ties), where time is left.
# Throughout, nvidia-smi logs the GPU's clocks, power and clock-event reasons every 200 ms into
# clocks.csv: the bench's progress lines carry the time of day, to tell whether the slow stretches
# of the cfa22d4 call (BENCHMARKS.md, item 4) were the clocks.
# The benchmark processes share one tune file (/tmp/tune.json, RESNET_WGPU_TUNE_FILE): a shape
# tuned in step 2b is not tuned again in steps 3 and 4 (their tune logs say "from the tune
# file"), which leaves their time to measuring. The file goes at the end of info.txt.
# Outputs go under $OUT (the device tool brings them back; at most 8 files: this writes 8, the
# coop test's log into tests.log).
set -u
start=$(date +%s)
LIMIT=${LIMIT:-540}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
source .device/vulkan-env.sh
export WGPU_BACKEND=vulkan PYTHONUNBUFFERED=1
for f in .device/*.gz; do b=$(basename "$f" .gz); gunzip -c "$f" > "/tmp/$b" && chmod +x "/tmp/$b"; done
timeout -k 5 30 /tmp/resnet-wgpu info 2>&1 | tee "$OUT/info.txt"
# What would otherwise go only to the console (its last 12,000 characters come back): into
# info.txt too.
note() { echo "$*" | tee -a "$OUT/info.txt"; }
# The bench prints the checkout's commit; the binaries are the pack's.
packed=unknown; changed=0
if [ -f .device/pack.txt ]; then packed=$(head -1 .device/pack.txt); changed=$(( $(wc -l < .device/pack.txt) - 1 )); fi
note "binaries packed at $packed ($changed tracked files changed beside it)"
here=$(git rev-parse HEAD 2>/dev/null || true)
if [ -n "$here" ] && [ "$packed" != "$here" ]; then
    note "WARNING: the checkout is at $here, the pack at $packed: the figures are the pack's"
fi
q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
nvidia-smi --query-gpu=$q,clocks_event_reasons.active --format=csv -lms 200 > "$OUT/clocks.csv" 2>&1 &
clocks=$!
sleep 1
if ! kill -0 $clocks 2>/dev/null; then # an older nvidia-smi without the reasons field
    nvidia-smi --query-gpu=$q --format=csv -lms 200 > "$OUT/clocks.csv" 2>&1 &
    clocks=$!
fi
# Only the benchmark processes take it (the tests open contexts of their own).
TUNE=/tmp/tune.json
rm -f $TUNE
summary() { grep -E "^test result|panicked|relative L2 error|skipped" "$1" | head -6; }

echo "=== coop test ($(left) s left)"
timeout -k 5 60 /tmp/t_coop --test-threads 2 --nocapture > /tmp/t_coop.log 2>&1
coop_rc=$?
note "test coop exit $coop_rc"; summary /tmp/t_coop.log
{ echo "##### coop"; cat /tmp/t_coop.log; } >> "$OUT/tests.log"
# Off where a test failed or the process died (not where it ran out of time, 124 or 137, or
# its binary was left out).
if grep -qE "panicked|FAILED" /tmp/t_coop.log || { [ -x /tmp/t_coop ] && [ $coop_rc -ne 0 ] && [ $coop_rc -ne 124 ] && [ $coop_rc -ne 137 ]; }; then
    export RESNET_WGPU_COOP=0
    note "cooperative matrices off for the benchmark"
fi

echo "=== critical ($(left) s left)"
# Up to 130 s: the first use of each shape builds and times every candidate (13 tile
# configurations, and the cooperative and Winograd ones); later steps read the choices from $TUNE.
torch=()
[ -f .device/torch_unit.py ] && torch=(--torch .device/torch_unit.py)
RESNET_WGPU_TUNE_FILE=$TUNE RESNET_WGPU_CONV_TUNE_LOG=1 timeout -k 5 130 /tmp/resnet-wgpu bench --full --only unit \
    --shapes 32,128,28,28 32,256,14,14 32,512,7,7 "${torch[@]}" --json /tmp/critical.json > "$OUT/critical.txt" 2>&1
note "critical exit $? ($(left) s left)"
grep -E "^unit|^autotuner|conv tune (winograd|weight split)" "$OUT/critical.txt" | cut -c1-200 | head -70

echo "=== bench ($(left) s left)"
peers=()
[ -x /tmp/burn-unit ] && peers+=(--burn /tmp/burn-unit)
[ -f .device/torch_unit.py ] && peers+=(--torch .device/torch_unit.py)
l=$(left); b=$(( l - 220 )); [ $b -gt 260 ] && b=260; [ $b -lt 60 ] && b=60
# The standard shapes, those step 2b tuned first: their profiles come first where time runs out.
shapes=(32,128,28,28 32,256,14,14 32,512,7,7 32,64,56,56 128,16,32,32 128,32,16,16 128,64,8,8)
RESNET_WGPU_TUNE_FILE=$TUNE RESNET_WGPU_CONV_TUNE_LOG=1 timeout -k 5 $b /tmp/resnet-wgpu bench --full --profile --skip "train step" \
    --shapes "${shapes[@]}" "${peers[@]}" --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
note "bench exit $? (timeout $b s; $(left) s left)"
# Our rows (the last table printed: with peers the bench prints ours first, then the whole
# report), then the peers' ratios; where the bench was cut short, the peers' lines as they came.
from=1; [ "$(grep -c "^wrote " "$OUT/bench.txt")" -ge 2 ] && from=$(grep -n "^wrote " "$OUT/bench.txt" | head -1 | cut -d: -f1)
tail -n +"$from" "$OUT/bench.txt" | grep -E "^(conv3x3|bn|unit|net|autotuner)" | head -100
if grep -q "^peers: ratio" "$OUT/bench.txt"; then
    sed -n '/^peers: ratio/,$p' "$OUT/bench.txt" | cut -c1-200 | head -100
else
    grep -E "peer: |peer skipped" "$OUT/bench.txt" | cut -c1-200 | head -60
fi

echo "=== variants ($(left) s left)"
{
    # Where a tiled convolution's time goes: each plain op (f32 forward, backward_data,
    # backward_weight; f16 forward) timed again with the loads, the products, then the loads and
    # staging of its main loop left out (bench --leave-out), on the tuned tiles, Winograd off.
    # The f16 path on tensor cores reached only a few percent of their peak (cfa22d4): is its
    # time the staging? And the f32 tiles', at 24% to 33% of the FP32 peak?
    if [ "$(left)" -ge 200 ]; then
        RESNET_WGPU_TUNE_FILE=$TUNE RESNET_WGPU_CONV_WINOGRAD=off timeout -k 5 40 /tmp/resnet-wgpu bench --full \
            --only conv3x3 --shapes 32,128,28,28 32,512,7,7 --leave-out > /tmp/v.txt 2>&1
        echo "exit $?"
        grep -E "^  conv3x3 (forward|backward_data|backward_weight) |without|no stage" /tmp/v.txt | sed "s/^/stages: /"
    fi
    # The network rows (left out of step 3, so that their tuning cannot cost its later rows).
    l=$(left); t=$(( l - 150 )); [ $t -gt 120 ] && t=120; [ $t -lt 60 ] && t=60
    RESNET_WGPU_TUNE_FILE=$TUNE RESNET_WGPU_CONV_TUNE_LOG=1 timeout -k 5 $t /tmp/resnet-wgpu bench --full --only "train step" > /tmp/v.txt 2>&1
    echo "exit $? (timeout $t s)"
    grep -E "net|networks|one submission" /tmp/v.txt | grep -v "conv tune"
    echo "tuner lines: $(grep "conv tune" /tmp/v.txt | grep -vc "from the tune file") timed," \
        "$(grep -c "from the tune file" /tmp/v.txt) from the tune file"
    # PyTorch's step of the same network at the same batch (fp32 with TF32 off, tf32, fp16).
    if [ -f .device/torch_resnet.py ] && [ "$(left)" -ge 100 ]; then
        timeout -k 5 60 python3 .device/torch_resnet.py bench --n 128 --reps 30 > /tmp/v.txt 2>&1
        echo "exit $?"; grep -E "^\{|Error" /tmp/v.txt | sed "s/^/torch: /"
    fi
    # The deep layers' units without Winograd (the tiled kernels alone, as before it was a
    # candidate), beside step 3's rows, where the tuner may have taken it (its `conv tune
    # winograd` lines time both per convolution).
    if [ "$(left)" -ge 170 ]; then
        RESNET_WGPU_TUNE_FILE=$TUNE RESNET_WGPU_CONV_WINOGRAD=off timeout -k 5 70 /tmp/resnet-wgpu bench --full --only unit \
            --shapes 32,256,14,14 32,512,7,7 > /tmp/v.txt 2>&1
        echo "exit $?"; grep -E "^unit" /tmp/v.txt | sed "s/^/winograd=off: /"
    fi
    # The tiled data ops tap-major (the default since 0af70fe) and channel-major (the order
    # before it), in turn, on the same tuned tiles (the tune file), Winograd off: the tap-major
    # gather is not measured on a GPU (it does less arithmetic per element, but an element's
    # reuse by the next tap comes a tile later, within its block of channels, not in the same
    # tile).
    for taps in on off; do
        [ "$(left)" -ge 190 ] || break
        RESNET_WGPU_TUNE_FILE=$TUNE RESNET_WGPU_CONV_TAPS=$taps RESNET_WGPU_CONV_WINOGRAD=off timeout -k 5 45 \
            /tmp/resnet-wgpu bench --full --only conv3x3 --shapes 32,128,28,28 32,256,14,14 > /tmp/v.txt 2>&1
        echo "exit $?"; grep -E "^conv3x3 (forward|backward_data)" /tmp/v.txt | sed "s/^/taps=$taps: /"
    done
    # The deep layers' convolutions with wgpu's bounds checks back in the tiled modules, to set
    # beside step 3's rows (built without them on Vulkan GPUs: Gpu::shader_module_in_range).
    if [ "$(left)" -ge 160 ]; then
        RESNET_WGPU_TUNE_FILE=$TUNE RESNET_WGPU_SHADER_CHECKS=all timeout -k 5 60 /tmp/resnet-wgpu bench --full --only conv3x3 \
            --shapes 32,256,14,14 32,512,7,7 > /tmp/v.txt 2>&1
        echo "exit $?"; grep -E "^conv3x3" /tmp/v.txt | sed "s/^/checks=all: /"
    fi
} > "$OUT/variants.txt" 2>&1
cat "$OUT/variants.txt"

echo "=== tests ($(left) s left)"
# Since the tiled convolutions build without wgpu's bounds checks on Vulkan GPUs (c.f.
# Gpu::shader_module_in_range), conv, coop and the unit and network tests run them so.
for t in f16_network conv units f16_units network variants batch_norm no_subgroups binding_limit folded_dispatch; do
    l=$(left); [ "$l" -lt 30 ] && { echo "skip test $t: time"; continue; }
    to=$(( l - 10 < 60 ? l - 10 : 60 ))
    checks=${RESNET_WGPU_SHADER_CHECKS:-}
    exe="/tmp/t_$t"
    RESNET_WGPU_SHADER_CHECKS=$checks timeout -k 5 $to "$exe" --test-threads 4 --nocapture > "/tmp/t_$t.log" 2>&1
    echo "test $t exit $? ($(left) s left)"; summary "/tmp/t_$t.log"
    # At most 8 files come back: the test logs go into one.
    { echo "##### $t"; cat "/tmp/t_$t.log"; } >> "$OUT/tests.log"
done

echo "=== torch_check ($(left) s left)"
# Its two timeouts and their kills: 110 s at most.
if [ "$(left)" -ge 115 ]; then
    {
        timeout -k 5 60 /tmp/torch_check tests/fixtures/torch-resnet20-original-b 2>&1 | grep -v XDG
        echo "torch_check exit ${PIPESTATUS[0]} (1: a pairing past the bound; 124/137: out of time)"
        # ReLU inputs within rounding of zero: the fixture's gradients against the f64
        # reference (BENCHMARKS.md, the H200's 3.6e-3 with the vec4 kernels), on the fixture and
        # on a random batch (seed 2), where ties can fall.
        timeout -k 5 20 /tmp/relu_ties "" 2>&1 | grep -v XDG
        echo "relu_ties exit ${PIPESTATUS[0]}"
        timeout -k 5 15 /tmp/relu_ties 2 2>&1 | grep -v XDG
        echo "relu_ties 2 exit ${PIPESTATUS[0]}"
    } > "$OUT/torch_check.txt"
    cat "$OUT/torch_check.txt"
else
    echo "skip torch_check: time"
fi

kill $clocks 2>/dev/null
{ echo "##### tune file"; cat $TUNE; } >> "$OUT/info.txt" 2>&1
echo "=== done at $(( $(date +%s) - start )) s"

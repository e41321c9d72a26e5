#!/usr/bin/env bash
# Conv tile configurations and the benchmark table on a GPU machine, in under 4 minutes.
#
#   tools/gpu_tune.sh target/release/resnet-wgpu [extra bench options, e.g. --torch PATH]
#
# Run from the repository root with a prebuilt release binary. Prints, for the ImageNet-like
# (batch 32) and CIFAR (batch 128) stage shapes:
#   1. the autotuner's timing of every tile configuration for each conv op and shape (GPU
#      timestamps, median of 3 runs after a warm-up) and the one it chose, then the conv rows
#      of the benchmark with those choices (bench --full);
#   2. each configuration forced in turn (RESNET_WGPU_CONV_TILE), conv rows only, bench --quick;
#   3. the whole benchmark table (kernels, batch norm, units; the extra options go here).
# JSON goes to runs/gpu-tune/. Each step has a time limit, so the script ends even if one hangs.
# For a GPU machine of one's own: the device tool's calls use tools/device_run.sh (this writes
# nothing under $OUT and loads no Vulkan environment).
set -u
BIN=${1:?usage: tools/gpu_tune.sh RELEASE_BINARY [bench options]}
shift
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
SHAPES=${SHAPES:-"32,64,56,56 32,128,28,28 32,256,14,14 32,512,7,7 128,16,32,32 128,32,16,16 128,64,8,8"}
DIR=runs/gpu-tune
mkdir -p "$DIR"
start=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - start )) s elapsed)"; }

step "adapter"
timeout 20 "$BIN" info

step "1. autotuner: every configuration per conv op and shape, then the tuned conv rows"
RESNET_WGPU_CONV_TUNE_LOG=1 timeout 60 "$BIN" bench --full --only conv --shapes $SHAPES \
    --json "$DIR/conv-tuned.json" 2>&1 | grep -v '^  conv'

step "2. each configuration forced (bench --quick, conv only)"
# The configurations that fit this adapter, as `info` lists them.
names=$(timeout 20 "$BIN" info 2>/dev/null | sed -n 's/^conv tiles: //p')
for t in $names; do
    left=$(( 200 - ($(date +%s) - start) ))
    if [ "$left" -lt 60 ]; then echo "(skipping $t and the rest: time)"; break; fi
    echo "--- tile $t"
    RESNET_WGPU_CONV_TILE=$t timeout 25 "$BIN" bench --quick --only conv --shapes $SHAPES \
        --json "$DIR/conv-$t.json" 2>&1 | grep -E '^conv3x3|ignored'
done

step "3. the whole table, tuned"
left=$(( 235 - ($(date +%s) - start) ))
timeout $(( left > 30 ? left : 30 )) "$BIN" bench --full --json "$DIR/bench.json" "$@" 2>&1 | grep -v '^  '
step "done"

#!/usr/bin/env bash
# Packs what one GPU-device call needs into .device/ (git-ignored; under the 64 MiB carry limit):
# the release CLI, examples/torch_check and relu_ties, the GPU-relevant test binaries, the burn peer
# binary given as the first argument, and the PyTorch scripts. Then run tools/device_run.sh there in one call:
#
#   tools/device_pack.sh [BURN_BINARY]
#   device run: bash tools/device_run.sh   (carry .gl and .device; see ../shared/gpu/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
cargo build --release
cargo build --release --example torch_check --example relu_ties
pack() { strip -o "/tmp/pack-$2" "$1" && gzip -c "/tmp/pack-$2" > ".device/$2.gz"; }
pack target/release/resnet-wgpu resnet-wgpu
pack target/release/examples/torch_check torch_check
pack target/release/examples/relu_ties relu_ties
for t in conv batch_norm variants network units f16_units f16_network coop binding_limit no_subgroups folded_dispatch; do
    exe=$(cargo test --no-run --test "$t" 2>&1 | sed -n "s/.*Executable tests\/$t.rs (\(.*\))/\1/p")
    pack "$exe" "t_$t"
done
if [ -n "${1:-}" ]; then pack "$1" burn-unit; fi
cp tools/torch_resnet.py .device/
for f in ../shared/peers/torch_unit.py ../shared/gpu/vulkan-env.sh; do [ -f "$f" ] && cp -f "$f" .device/; done
du -sh .device

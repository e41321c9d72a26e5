#!/usr/bin/env bash
# Packs what one GPU-device call needs into .device/ (git-ignored; under the 64 MiB carry limit):
# the release CLI, examples/torch_check and relu_ties, the GPU-relevant test binaries, the burn peer
# binary given as the first argument, and the PyTorch scripts. Then run tools/device_run.sh there in one call:
#
#   tools/device_pack.sh [BURN_BINARY]
#   device run: bash tools/device_run.sh   (carry .gl and .device; see ../shared/gpu/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
# Nothing of an older pack travels (an old burn-unit.gz would run as the peer).
rm -rf .device && mkdir -p .device
cargo build --release
cargo build --release --example torch_check --example relu_ties
pack() { strip -o "/tmp/pack-$2" "$1" && gzip -9 -c "/tmp/pack-$2" > ".device/$2.gz"; }
t=${CARGO_TARGET_DIR:-target}
pack "$t/release/resnet-wgpu" resnet-wgpu
pack "$t/release/examples/torch_check" torch_check
pack "$t/release/examples/relu_ties" relu_ties
for t in conv batch_norm variants network units f16_units f16_network coop binding_limit no_subgroups folded_dispatch; do
    exe=$(cargo test --no-run --test "$t" 2>&1 | sed -n "s/.*Executable tests\/$t.rs (\(.*\))/\1/p")
    pack "$exe" "t_$t"
done
if [ -n "${1:-}" ]; then pack "$1" burn-unit; fi
cp tools/torch_resnet.py .device/
# The commit the binaries were built from, and the files changed beside it: device_run.sh
# prints them and says where the checkout it runs in is another (a stale pack).
{ git rev-parse HEAD; git status --porcelain --untracked-files=no; } > .device/pack.txt
# Both needed: without vulkan-env.sh the call finds no Vulkan loader (set -e stops here).
cp -f ../shared/peers/torch_unit.py ../shared/gpu/vulkan-env.sh .device/
# What travels: the tracked and untracked (not ignored) files, .device and .gl, under the
# device tool's 64 MiB carry limit, with a margin; over it the call is refused.
# (A tracked file deleted here, or no .gl, fails stat or find: counted as nothing, not an exit.)
bytes() { { xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }'; }
tree=$(git ls-files -z --cached --others --exclude-standard | bytes)
packed=$({ find .device .gl -type f -print0 2>/dev/null || true; } | bytes)
total=$(( tree + packed ))
echo "carry: $(( total / 1048576 )) MiB ($tree bytes of the tree, $packed of .device and .gl)"
if [ $total -gt $(( 63 * 1048576 )) ]; then
    echo "over 63 MiB: the device tool refuses past 64 MiB; leave a test binary out" >&2
    exit 1
fi

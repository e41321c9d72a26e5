#!/usr/bin/env bash
# Runs a command on a newer Mesa lavapipe, one that offers cooperative matrices (8x8x8, f16
# operands with f16 or f32 accumulators), so that the f16 path's tensor-core kernels
# (shaders/conv_tiled_coop.wgsl) can be tested without a GPU:
#
#   tools/lavapipe_coop.sh target/debug/deps/coop-<hash> --nocapture
#   tools/lavapipe_coop.sh --check          # exit 0 where that lavapipe offers them, 3 where
#                                           # the CLI fails on it, else 1 (or the fetch's code:
#                                           # apt's 100, dpkg's 2)
#
# Debian 12's Mesa (22.3, CI's lavapipe) has no cooperative matrices; Debian 13's backports
# (mesa-vulkan-drivers 26.x) does. This fetches that package with its dependencies (Debian 13's
# glibc, LLVM and Vulkan loader among them, about 63 MB) into $LAVAPIPE_COOP_DIR (default
# ~/.cache/lavapipe-coop) once, unpacks it there, and runs the command under Debian 13's dynamic
# loader with those libraries first, so nothing is installed on the system. Programs the
# command starts in turn run on the system's libraries instead, unless started through this
# script too (tests/cli.rs starts the CLI through cargo's test runner where one is set).
set -euo pipefail
dir=${LAVAPIPE_COOP_DIR:-$HOME/.cache/lavapipe-coop}
lib=$dir/root/usr/lib/x86_64-linux-gnu

if [ ! -f "$dir/icd.json" ]; then
    mkdir -p "$dir/parts" "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/root"
    cat > "$dir/parts/trixie.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # An empty package status: apt resolves every dependency, as for a bare Debian 13, and only
    # downloads.
    apt=(apt-get -qq -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$dir/parts"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o Dir::State::status=/dev/null
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    "${apt[@]}" update
    "${apt[@]}" -y --no-install-recommends --download-only -t trixie-backports install mesa-vulkan-drivers libvulkan1
    for f in "$dir"/cache/archives/*.deb; do dpkg -x "$f" "$dir/root"; done
    # Only lavapipe of the package's drivers (the others are 130 MB).
    find "$lib" -name 'libvulkan_*.so' ! -name libvulkan_lvp.so -delete
    sed "s#\"library_path\": \"[^\"]*\"#\"library_path\": \"$lib/libvulkan_lvp.so\"#" \
        "$dir/root/usr/share/vulkan/icd.d/lvp_icd.json" > "$dir/icd.json"
    rm -rf "$dir/cache/archives" "$dir/lists"
fi

export VK_DRIVER_FILES=$dir/icd.json WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
if [ "${1:-}" = "--check" ]; then
    # The loader and driver in one process: the CLI's info line names the cooperative matrices.
    exe=${2:-target/debug/resnet-wgpu}
    if ! out=$("$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$exe" info 2>&1); then
        echo "$out" >&2
        exit 3
    fi
    echo "$out" >&2
    grep -q "cooperative matrix: offered" <<< "$out"
    exit
fi
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$@"

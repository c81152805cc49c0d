#!/usr/bin/env bash
# Download the peers' wheels for the lent GPU machine (Python 3.12, manylinux x86_64, torch 2.11,
# no package index there) into the gitignored folder .whl/ at the repo root, which a device run
# carries (`carry: [".whl"]`); perf/gpu_check.sh installs them offline with
# `pip install --no-index --no-deps .whl/*.whl` and reports each peer's version or import error.
#
#   bash perf/fetch_peer_wheels.sh      # from the repo root; WHEEL_DIR=... puts them elsewhere
#
# Versions are pinned (one version of each: two of one package stop the whole offline install):
# each works with torch 2.11 (torchao 0.18 loads its C++ extensions from torch 2.11 on; the others
# ask only torch>=2.2..2.6). Their other requirements are in the GPU image already (numpy 2.5,
# packaging, opt-einsum, triton 3.6; KINDS.md's package list), so nothing else is fetched.
# Every wheel is py3-none or cp310-abi3: the same files install on the CPU machine's Python 3.11,
# which is how the offline install is checked here. About 47 MB in all (bitsandbytes 43 MB), well
# inside the 64 MiB a run carries with the working tree.
set -euo pipefail

WHEEL_DIR=${WHEEL_DIR:-.whl}
PY=${PYTHON:-python3}
PEERS=(
    torch-optimi==0.3.3
    torchao==0.18.0
    heavyball==3.2.1
    bitsandbytes==0.50.2
    flashoptim==0.1.4
)
# pip matches a manylinux tag exactly: list every glibc level the wheels above are built for.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p "$WHEEL_DIR"
# a stale wheel of another version beside the pinned one would break the offline install
for spec in "${PEERS[@]}"; do
    dist=${spec%%==*}
    rm -f "$WHEEL_DIR"/"${dist//-/_}"-*.whl "$WHEEL_DIR"/"$dist"-*.whl
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$WHEEL_DIR" "${PEERS[@]}"

total=$(du -cb "$WHEEL_DIR"/*.whl | tail -1 | cut -f1)
echo "wheels in $WHEEL_DIR: $(ls "$WHEEL_DIR"/*.whl | wc -l) files, $((total / 1024 / 1024)) MiB"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
    echo "warning: over 60 MiB; with the working tree this may pass the 64 MiB a run carries" >&2
fi

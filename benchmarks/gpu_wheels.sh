#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on a GPU machine without network (Python 3.12, manylinux
# x86_64), into .whl/ (git-ignored). Run it here, with network or a package mirror, then carry .whl/
# and install there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# (benchmarks/README.md, "GPU check").
#
#   benchmarks/gpu_wheels.sh          # what the lent H200 image lacks (~42 MB): av, lmdb, webdataset,
#                                     # DeepSpeed and the parts of its needs not there (hjson, pydantic)
#   benchmarks/gpu_wheels.sh --full   # also transformers, pytest and DeepSpeed's other needs, for a
#                                     # machine with only torch/torchvision/torchaudio/accelerate/
#                                     # tensorboard (~66 MB: more than one device call carries, see README)
#
# DeepSpeed is published as a source distribution only: its wheel is built here (pure Python, no
# compiled ops: DS_BUILD_OPS=0), without build isolation because its setup.py imports torch.
# transformers is needed because Accelerate's DeepSpeed plugin imports it.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=.whl
# Versions of this project's CPU runs (run_info.json); the rest resolve to the newest.
PACKAGES=(av==18.1.0 lmdb==3.0.0 webdataset==1.0.2 hjson pydantic)
if [[ "${1:-}" == "--full" ]]; then
    PACKAGES+=(transformers==5.24.0 pytest==9.2.0 einops msgpack ninja py-cpuinfo)
fi
DEEPSPEED=deepspeed==0.19.8
# Required by torch, torchvision, Accelerate or TensorBoard, so present wherever those are: dropped.
PRESENT_THERE=(numpy pillow pyyaml packaging psutil safetensors tqdm filelock fsspec jinja2 markupsafe
               protobuf setuptools sympy mpmath networkx)

mkdir -p "$OUT"
"$PYTHON" -m pip download --dest "$OUT" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${PACKAGES[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$OUT" "$DEEPSPEED"

for name in "${PRESENT_THERE[@]}"; do
    # Wheel names use the normalised project name (lower case, '_' for '-'), any case on disk.
    find "$OUT" -maxdepth 1 -iname "${name}-*.whl" -print -delete
done
ls -l "$OUT"
du -sh "$OUT"

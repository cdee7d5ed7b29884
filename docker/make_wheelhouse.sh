#!/usr/bin/env bash
# Wheels of the project and all its dependencies into docker/wheels/ (git-ignored), so the
# images build without network access. Run on the host, from anywhere; needs pip access
# to a package index (or a local mirror) once.
#
# Usage: docker/make_wheelhouse.sh [--cpu]
#   (default)  the pinned torch and torchvision as the package index serves them (on PyPI:
#              the CUDA builds, for images that also train on GPU nodes)
#   --cpu      the CPU-only builds of the same pins (torch==X+cpu, torchvision==Y+cpu) from
#              $TORCH_CPU_INDEX (default: PyTorch's CPU index), for slim CPU images
# Both leave flwr's `simulation` extra (Ray) out: the images run SuperLinks and SuperNodes,
# never the simulation engine. docker/wheels/requirements.txt lists what the images install.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
variant="${1:-default}"
case "$variant" in default | --cpu) ;; *) echo "usage: $0 [--cpu]" >&2; exit 2 ;; esac
wheels="$root/docker/wheels"
rm -rf "$wheels"
mkdir -p "$wheels"
python3 - "$root/pyproject.toml" "$variant" > "$wheels/requirements.txt" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    dependencies = tomllib.load(file)["project"]["dependencies"]
for requirement in dependencies:
    requirement = requirement.replace("flwr[simulation]", "flwr")
    if sys.argv[2] == "--cpu" and re.fullmatch(r"(torch|torchvision)==[0-9.]+", requirement):
        requirement += "+cpu"
    print(requirement)
PY
index=()
if [ "$variant" = --cpu ]; then
  index=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
fi
python3 -m pip wheel --quiet "${index[@]}" --wheel-dir "$wheels" -r "$wheels/requirements.txt"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$root"
echo "wheelhouse ($variant): $(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1) in docker/wheels"

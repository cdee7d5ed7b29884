#!/usr/bin/env bash
# Wheels of the project and all its dependencies into docker/wheels/ (git-ignored), so the
# images build without network access. Run on the host, from anywhere; needs pip access
# to a package index (or a local mirror) once.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/docker/wheels"
python3 -m pip wheel --quiet --wheel-dir "$root/docker/wheels" "$root"
echo "wheelhouse: $(ls "$root/docker/wheels" | wc -l) wheels, $(du -sh "$root/docker/wheels" | cut -f1) in docker/wheels"

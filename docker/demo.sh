#!/usr/bin/env bash
# The docker-compose demo: 1 SuperLink + the SuperNodes of docker/federation.toml, each in
# its container (host networking, TLS + SuperNode authentication), a short kta run
# submitted from the host with `flwr run`, results in docker/results/, then everything
# stopped. Needs the images (docker-compose -f docker/compose.yml build) and a running
# Docker engine. Usage: docker/demo.sh [run-config key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
compose=(docker-compose -f docker/compose.yml -p kta-flwr)
read -r port nodes < <(python3 -c 'from kta_flwr.tools.topology import load_topology as l; t = l(); print(t.superlink_port, len(t.partition_ids))')

[ -f docker/certs/ca.crt ] || python3 -m kta_flwr.tools.certs docker/certs --supernodes "$nodes"
mkdir -p docker/results docker/data
shopt -s nullglob
export FLWR_HOME
FLWR_HOME="$(mktemp -d)"
cleanup() { "${compose[@]}" down --timeout 20 >/dev/null 2>&1 || true; rm -rf "$FLWR_HOME"; }
trap cleanup EXIT

"${compose[@]}" up -d --no-build superlink
python3 -c "from kta_flwr.tools.federation import wait_for_port; wait_for_port($port, 120)"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "docker"

[superlink.docker]
address = "127.0.0.1:$port"
root-certificates = "$PWD/docker/certs/ca.crt"
TOML
for ((i = 0; i < nodes; i++)); do
  flwr supernode register "docker/certs/supernode-$i.pub" docker
done
"${compose[@]}" up -d --no-build
before=(docker/results/*/results.json)
flwr run . docker --stream --run-config "output-dir='/results' min-nodes=$nodes $*"
after=(docker/results/*/results.json)
"${compose[@]}" logs --no-color --tail 5
if [ "${#after[@]}" -le "${#before[@]}" ]; then
  echo "demo: no new results in docker/results" >&2
  exit 1
fi
echo "demo: results in $(dirname "$(ls -t "${after[@]}" | head -1)")"

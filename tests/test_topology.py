"""The demo federation's settings, the compose files rendered from them, and the
`deploy local` launcher that runs the same topology as processes."""

import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from kta_flwr.config import ConfigError
from kta_flwr.tools.deploy import main as deploy_main
from kta_flwr.tools.federation import stage_app
from kta_flwr.tools.topology import COMPOSE, SETTINGS, load_topology, render_compose, render_gpu_override


def test_committed_compose_files_are_rendered_from_the_settings():
    topo = load_topology()
    assert COMPOSE.read_text() == render_compose(topo)
    assert (COMPOSE.parent / "compose.gpu.yml").read_text() == render_gpu_override(topo)
    compose = COMPOSE.read_text()
    assert "network_mode: host" in compose and "bridge" not in compose
    assert compose.count("--enable-supernode-auth") == 1
    assert "--insecure" not in compose
    for i, pid in enumerate(topo.partition_ids):
        assert f'"partition-id={pid} num-partitions={topo.num_partitions}"' in compose
        assert f'"/certs/supernode-{i}"' in compose


@pytest.mark.parametrize("edit, message", [
    (("partition-ids = [0, 1, 2]", "partition-ids = [0, 0]"), "repeats a partition"),
    (("partition-ids = [0, 1, 2]", "partition-ids = [0, 5]"), "partition 5 >= 'num-partitions'"),
    (("port = 9093", "port = -1"), "'port' = -1"),
    (("certs = \"docker/certs\"", ""), "missing 'certs'"),
])
def test_bad_settings_name_the_key(tmp_path, edit, message):
    bad = tmp_path / "federation.toml"
    bad.write_text(SETTINGS.read_text().replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load_topology(bad)
    assert deploy_main(["compose", "--settings", str(bad)]) == 2


def test_compose_config_is_valid():
    """`docker-compose config` accepts both files (CI installs docker-compose; no build)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        reason = "docker-compose is not installed"
        if os.environ.get("KTA_REQUIRE_COMPOSE") == "1":
            pytest.fail(reason + "; KTA_REQUIRE_COMPOSE=1 makes this check mandatory")
        pytest.skip(reason)
    for files in (["compose.yml"], ["compose.yml", "compose.gpu.yml"]):
        args = [binary] + [a for f in files for a in ("-f", str(COMPOSE.parent / f))] + ["config", "-q"]
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_deploy_local_runs_the_compose_topology(tmp_path, capfd):
    """`python -m kta_flwr.tools.deploy local`: TLS + node auth, 3 SuperNodes, results on disk."""
    settings = tmp_path / "federation.toml"
    text = SETTINGS.read_text()
    for key in ("certs", "data", "results", "models"):
        text = text.replace(f'{key} = "docker/{key}"', f'{key} = "{tmp_path / key}"')
    settings.write_text(text.replace("port = 9093", "port = 9193").replace("first-port = 9101", "first-port = 9201"))
    rc = deploy_main(["local", "--settings", str(settings), "--set", "num-server-rounds=1",
                      "reference-size=100", "test-size=100", "local-epochs=1", "tracking=none"])
    out = capfd.readouterr().out
    assert rc == 0, out[-3000:]
    assert "created a CA" in out and "(TLS, node authentication) + 3 SuperNodes up" in out
    (run_dir,) = [p.parent for p in (tmp_path / "results").glob("*/results.json")]
    assert sorted(p.name for p in (tmp_path / "results" / "federation" / "logs").iterdir()) == [
        "superlink.log", "supernode-0.log", "supernode-1.log", "supernode-2.log"]
    # a second time with the same settings (the SuperLink's old database is not reused),
    # resuming the first run for one more round: reported as the success it is
    rc = deploy_main(["local", "--settings", str(settings), "--set", "num-server-rounds=2",
                      "reference-size=100", "test-size=100", "local-epochs=1",
                      "tracking=none", f"resume-from={run_dir}"])
    out = capfd.readouterr().out
    assert rc == 0, out[-3000:]
    assert f"[deploy] results in {run_dir}" in out and "created a CA" not in out
    assert [r["round"] for r in json.loads((run_dir / "results.json").read_text())["rounds"]] == [1, 2]


def test_a_staged_app_builds_the_repositorys_fab(tmp_path):
    """Runs are submitted from the app's FAB files staged once (``flwr run`` walks every
    file under the folder it is given): the FAB built from there holds the same files,
    byte for byte, as the one built from the repository."""
    root = Path(__file__).resolve().parents[1]
    staged = stage_app(root, tmp_path / "app")
    fabs = [zipfile.ZipFile(io.BytesIO(build_fab_from_disk(path))) for path in (root, staged)]
    names = [sorted(fab.namelist()) for fab in fabs]
    assert names[0] == names[1] and "kta_flwr/maths/market.py" in names[0]
    assert all(fabs[0].read(name) == fabs[1].read(name) for name in names[0])
    assert sum(1 for p in staged.rglob("*") if p.is_file()) < 200

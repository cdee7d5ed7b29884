"""Start a real Flower federation as local processes and submit the app to it.

``LocalFederation`` launches ``flower-superlink`` and N ``flower-supernode`` processes on
127.0.0.1 (each SuperNode with its own ``partition-id``), waits until they listen instead
of sleeping, writes a ``config.toml`` connection for ``flwr run`` under a private
``FLWR_HOME``, and always stops every process on exit, also when a test fails. With
``simulation=True`` it starts a simulation-engine SuperLink instead of SuperNodes.

Usage::

    with LocalFederation(workdir, num_supernodes=2) as fed:
        proc = fed.submit(app_dir, {"num-server-rounds": 2})
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

CONNECTION = "kta-local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Block until 127.0.0.1:``port`` accepts connections.

    Raises:
        RuntimeError: if ``process`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with code {process.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def toml_value(value: Any) -> str:
    """Render a Python scalar as a TOML value (for ``--run-config``/``--node-config``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_arg(values: dict[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``'a=1 b="x"'``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


class LocalFederation:
    """A SuperLink (+ SuperNodes) on loopback, owned by this object."""

    def __init__(
        self,
        workdir: Path,
        num_supernodes: int = 2,
        *,
        simulation: bool = False,
        partition_ids: list[int] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.num_supernodes = num_supernodes
        self.simulation = simulation
        self.partition_ids = partition_ids or list(range(num_supernodes))
        self.startup_timeout = startup_timeout
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        #: flwr 1.41 serves the Runtime, Control and Fleet APIs on one HTTP port.
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    # --- lifecycle ------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment for every process: private FLWR_HOME, no runtime installs."""
        env = os.environ.copy()
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        self.processes.append(proc)
        return proc

    def start(self) -> None:
        """Start the SuperLink, then the SuperNodes; wait until each listens."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self._write_connection()
        try:
            link = self._spawn("superlink", self._superlink_args())
            wait_for_port(self.port, self.startup_timeout, link)
            if not self.simulation:
                for pid in self.partition_ids:
                    self.start_supernode(pid)
        except BaseException:
            self.stop()
            raise

    def _superlink_args(self) -> list[str]:
        args = [
            "flower-superlink", "--insecure",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--isolation", "subprocess",
            "--database", str(self.workdir / "state.db"),
        ]
        return args + (["--simulation"] if self.simulation else [])

    def start_supernode(self, partition_id: int) -> subprocess.Popen:
        """Start one SuperNode for ``partition_id`` (waits until its runtime API listens)."""
        port = free_port()
        node_config = config_arg(
            {"partition-id": partition_id, "num-partitions": self.num_supernodes}
        )
        proc = self._spawn(
            f"supernode-{partition_id}",
            [
                "flower-supernode", "--insecure",
                "--superlink", f"127.0.0.1:{self.port}",
                "--node-config", node_config,
                "--host", "127.0.0.1", "--port", str(port),
                "--isolation", "subprocess",
            ],
        )
        wait_for_port(port, self.startup_timeout, proc)
        return proc

    def stop(self) -> None:
        """Terminate every process (SIGTERM, then SIGKILL after 10 s), newest first.

        Also kills their descendants: the SuperExec starts each run's
        ``flwr-simulation``/``flwr-clientapp`` (and Ray) in new sessions, which a signal
        to the SuperLink's process group would not reach after an interrupted run.
        """
        orphans = [pid for proc in self.processes for pid in _descendants(proc.pid)]
        for proc in reversed(self.processes):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # --- runs -------------------------------------------------------------------
    def _write_connection(self) -> None:
        options = ""
        if self.simulation:
            options = f"options.num-supernodes = {self.num_supernodes}\n"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f"insecure = true\n{options}"
        )

    def submit(
        self, app_dir: Path, run_config: dict[str, Any], timeout: float = 600.0
    ) -> subprocess.CompletedProcess:
        """``flwr run <app_dir> <connection> --stream`` with ``run_config``; waits for the end."""
        args = ["flwr", "run", str(app_dir), CONNECTION, "--stream"]
        if run_config:
            args += ["--run-config", config_arg(run_config)]
        return subprocess.run(
            args, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _descendants(pid: int) -> list[int]:
    """All descendant process ids of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

"""Start a real Flower federation as local processes and submit the app to it.

The command lines of ``flower-superlink`` and ``flower-supernode`` are built here once,
for the launcher and for the compose file (:mod:`kta_flwr.tools.topology`).

``LocalFederation`` launches ``flower-superlink`` and N ``flower-supernode`` processes on
127.0.0.1 (each SuperNode with its own ``partition-id``), waits until they listen instead
of sleeping, writes a ``config.toml`` connection for ``flwr run`` under a private
``FLWR_HOME``, and always stops every process on exit, also when a test fails. With
``simulation=True`` it starts a simulation-engine SuperLink instead of SuperNodes.
Runs are submitted from a staged copy of the app (:func:`stage_app`): what its FAB
holds, built once per federation.

With ``credentials`` (see :mod:`kta_flwr.tools.certs`) the federation is secure: the SuperLink
serves TLS with the given certificate and only admits SuperNodes whose public key was
registered (``--enable-supernode-auth`` + ``flwr supernode register``); SuperNode ``i``
signs with key ``supernode-<i>``. Without, everything runs ``--insecure``.

Usage::

    with LocalFederation(workdir, num_supernodes=2) as fed:
        proc = fed.submit(app_dir, {"num-server-rounds": 2})
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

from flwr.cli.build import build_fab_from_disk

from kta_flwr.tools.certs import Credentials
from kta_flwr.tools.presets import config_arg, toml_value

CONNECTION = "kta-local"
#: The SuperLink's database in a federation's work folder (with SQLite's -wal/-shm files).
DATABASE = "state.db"


def stage_app(app_dir: Path, into: Path) -> Path:
    """The files of ``app_dir``'s FAB (what ``flwr build`` ships: its filters applied),
    unpacked into the empty folder ``into``, which is returned.

    ``flwr run <folder>`` walks and resolves every file under the folder before its
    filters drop them: from a checkout with a ``.venv`` and a ``results`` folder inside
    (~70,000 files) that is ~5 s of CPU per run. From the staged copy ``flwr run`` builds
    the same FAB from the ~90 files it holds.
    """
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(Path(app_dir)))) as fab:
        for name in fab.namelist():
            if not name.startswith(".info/"):  # the FAB's manifest, written anew by flwr run
                fab.extract(name, into)
    return into


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


def superlink_args(
    port: int, database: str | None, credentials: Credentials | None, *,
    simulation: bool = False, host: str = "127.0.0.1",
) -> list[str]:
    """``flower-superlink`` command line: TLS + SuperNode authentication with
    ``credentials``, ``--insecure`` without; subprocess isolation (the ServerApp runs in a
    child process of the SuperLink's SuperExec); state in ``database`` (None: in memory,
    so no stale nodes or key registrations survive a restart)."""
    args = ["flower-superlink", "--host", host, "--port", str(port), "--isolation", "subprocess"]
    if database is not None:
        args += ["--database", database]
    if credentials is None:
        return args + ["--insecure"] + (["--simulation"] if simulation else [])
    args += ["--ssl-ca-certfile", str(credentials.ca_cert),
             "--ssl-certfile", str(credentials.server_cert),
             "--ssl-keyfile", str(credentials.server_key)]
    return args + (["--simulation"] if simulation else ["--enable-supernode-auth"])


def supernode_args(  # pylint: disable=too-many-arguments
    superlink_port: int, port: int, partition_id: int, num_partitions: int,
    credentials: Credentials | None, key_index: int, *, host: str = "127.0.0.1",
) -> list[str]:
    """``flower-supernode`` command line for one partition: TLS with the CA's certificate
    and key ``supernode-<key_index>`` with ``credentials``, ``--insecure`` without."""
    node_config = config_arg({"partition-id": partition_id, "num-partitions": num_partitions})
    args = ["flower-supernode", "--superlink", f"{host}:{superlink_port}",
            "--node-config", node_config, "--host", host, "--port", str(port),
            "--isolation", "subprocess"]
    if credentials is None:
        return args + ["--insecure"]
    return args + ["--root-certificates", str(credentials.ca_cert),
                   "--auth-supernode-private-key", str(credentials.supernode_keys[key_index])]


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
        credentials: Credentials | None = None,
        port: int | None = None,
        supernode_ports: list[int] | None = None,
        num_partitions: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.num_supernodes = num_supernodes
        #: ``num-partitions`` in every SuperNode's node config.
        self.num_partitions = num_partitions or num_supernodes
        self.simulation = simulation
        self.partition_ids = partition_ids or list(range(num_supernodes))
        self.startup_timeout = startup_timeout
        self.credentials = credentials
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        #: flwr 1.41 serves the Runtime, Control and Fleet APIs on one HTTP port.
        self.port = port or free_port()
        self.supernode_ports = supernode_ports
        self.processes: list[subprocess.Popen] = []
        self._supernodes: dict[int, subprocess.Popen] = {}
        self._staged: dict[Path, Path] = {}

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
        log = (self.logs / f"{name}.log").open("a")  # a restarted node appends
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        self.processes.append(proc)
        return proc

    def start(self) -> None:
        """Start the SuperLink, then the SuperNodes; wait until each listens. A new
        federation starts from an empty SuperLink database (a ``workdir`` used before, as
        by ``deploy local``, would otherwise hold that SuperLink's key registrations and
        nodes: "Public key already in use")."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        for old in self.workdir.glob(f"{DATABASE}*"):
            old.unlink()
        self._write_connection()
        try:
            link = self._spawn("superlink", self._superlink_args())
            wait_for_port(self.port, self.startup_timeout, link)
            if not self.simulation:
                ports = self.supernode_ports or [None] * len(self.partition_ids)
                for pid, port in zip(self.partition_ids, ports):
                    if self.credentials is not None:
                        self.register_supernode(pid)
                    self.start_supernode(pid, port=port)
        except BaseException:
            self.stop()
            raise

    def _superlink_args(self) -> list[str]:
        return superlink_args(self.port, str(self.workdir / DATABASE), self.credentials,
                              simulation=self.simulation)

    def register_supernode(self, key_index: int) -> None:
        """``flwr supernode register`` the public key ``supernode-<key_index>.pub``.

        Raises:
            RuntimeError: with the CLI's output if registration fails.
        """
        assert self.credentials is not None, "registration needs credentials"
        proc = subprocess.run(
            ["flwr", "supernode", "register", str(self.credentials.public_key(key_index)), CONNECTION],
            env=self.env(), capture_output=True, text=True, check=False, timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"registering supernode-{key_index} failed:\n{proc.stdout}{proc.stderr}")

    def start_supernode(
        self, partition_id: int, key_index: int | None = None, *, insecure: bool = False,
        port: int | None = None, wait: bool = True,
    ) -> subprocess.Popen:
        """Start one SuperNode for ``partition_id``; with ``wait``, block until its runtime
        API listens (a node expected to be refused may exit before that: pass ``False``).

        With credentials it uses TLS and signs with key ``supernode-<key_index>`` (default:
        ``partition_id``; :meth:`start` registers the keys of the partitions it starts, other
        keys are refused unless :meth:`register_supernode` ran); ``insecure=True`` starts it
        without TLS or key (a secure SuperLink refuses it). ``port``: its own API port
        (default: a free one). Its log is ``logs/supernode-<partition_id>[-key<i>][-insecure].log``.
        """
        port = port or free_port()
        key = partition_id if key_index is None else key_index
        creds = None if insecure else self.credentials
        args = supernode_args(self.port, port, partition_id, self.num_partitions, creds, key)
        name = f"supernode-{partition_id}" + (f"-key{key}" if key != partition_id else "")
        proc = self._spawn(name + ("-insecure" if insecure else ""), args)
        self._supernodes[partition_id] = proc
        if wait:
            wait_for_port(port, self.startup_timeout, proc)
        return proc

    def stop(self) -> None:
        """Terminate every process (SIGTERM, then SIGKILL after 10 s), newest first.

        Also kills their descendants: the SuperExec starts each run's
        ``flwr-simulation``/``flwr-clientapp`` (and Ray) in new sessions, which a signal
        to the SuperLink's process group would not reach after an interrupted run.
        """
        self._end(signal.SIGTERM, grace=10.0)

    def kill(self) -> None:
        """SIGKILL every process and their descendants at once: a crash, not a shutdown
        (the fault tests kill a running ServerApp this way)."""
        self._end(signal.SIGKILL, grace=0.0)

    def kill_superlink(self, freeze: bool = False) -> list[int]:
        """SIGKILL the SuperLink alone, as a crash of that service: what it started in
        sessions of their own (the SuperExec's ServerApp or simulation process) lives on as
        an orphan. With ``freeze`` those are stopped (SIGSTOP) first, so an orphan holds
        on (to its run folder) without making progress. Returns the orphans' pids; end
        them with :func:`end_processes` (:meth:`stop` no longer finds them)."""
        link = self.processes[0]
        found = descendants(link.pid)
        if freeze:
            for pid in found:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGSTOP)
        _signal_group(link, signal.SIGKILL)
        link.wait()
        self.processes.remove(link)
        time.sleep(0.5)  # the group's members die; the orphans remain
        return [pid for pid in found if _alive(pid)]

    def kill_supernode(self, proc: subprocess.Popen) -> None:
        """SIGKILL one SuperNode (and its ClientApp processes), as a crashed device."""
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def supernode(self, partition_id: int) -> subprocess.Popen:
        """The running SuperNode process started last for ``partition_id``."""
        return self._supernodes[partition_id]

    def _end(self, sig: int, grace: float) -> None:
        orphans = [pid for proc in self.processes for pid in descendants(proc.pid)]
        for proc in reversed(self.processes):
            if proc.poll() is None:
                _signal_group(proc, sig)
        deadline = time.monotonic() + grace
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # --- runs -------------------------------------------------------------------
    def _write_connection(self) -> None:
        options = ""
        if self.simulation:
            options = f"options.num-supernodes = {self.num_supernodes}\n"
        security = "insecure = true\n"
        if self.credentials is not None:
            security = f"root-certificates = {toml_value(str(self.credentials.ca_cert))}\n"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f"{security}{options}"
        )

    def staged(self, app_dir: Path) -> Path:
        """``app_dir``'s FAB files, staged once per federation (:func:`stage_app`) in
        ``<workdir>/apps/<n>``."""
        key = Path(app_dir).resolve()
        if key not in self._staged:
            self._staged[key] = stage_app(key, self.workdir / "apps" / str(len(self._staged)))
        return self._staged[key]

    def submit(
        self, app_dir: Path, run_config: dict[str, Any], timeout: float = 600.0,
        *, echo: bool = False,
    ) -> subprocess.CompletedProcess:
        """``flwr run <app_dir> <connection> --stream`` with ``run_config``; waits for the
        end. Output is captured, or with ``echo`` goes to this process's terminal."""
        args = ["flwr", "run", str(self.staged(app_dir)), CONNECTION, "--stream"]
        if run_config:
            args += ["--run-config", config_arg(run_config)]
        return subprocess.run(
            args, env=self.env(), capture_output=not echo, text=True, timeout=timeout, check=False
        )


    def launch(self, app_dir: Path, run_config: dict[str, Any], name: str = "run") -> subprocess.Popen:
        """``flwr run <app_dir> <connection> --stream`` in the background (output in
        ``logs/<name>.log``); :meth:`stop` and :meth:`kill` end it with the rest."""
        args = ["flwr", "run", str(self.staged(app_dir)), CONNECTION, "--stream"]
        if run_config:
            args += ["--run-config", config_arg(run_config)]
        return self._spawn(name, args)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def end_processes(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL ``pids`` (stopped ones too) and wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
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

"""Run a fedsilo job in Flower's simulation engine on a SuperLink of its own.

``flwr run`` against the default local connection would start (or reuse!) a SuperLink on
port 39091 that every process on the machine shares, installs the app's dependencies at
run time, and keeps running afterwards. :class:`LocalSuperLink` instead starts
``flower-superlink --simulation`` on a free loopback port with a private ``FLWR_HOME``
and runtime dependency installation disabled, and stops it and all of its children (the
SuperExec, ``flwr-simulation`` and Ray) when the job ends or is interrupted.

Success is decided from the run's final status in ``flwr ls`` (``flwr run`` exits 0 even
when the run failed), never from an exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from app.runtime.pki import Certificates

CONNECTION = "fedsilo"
FINAL_PREFIX = "finished:"


class SimulationError(RuntimeError):
    """The SuperLink could not start, or the run did not complete."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process we start: private home, no installs, no calls out."""
    env = os.environ.copy()
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's FutureWarning about accelerator variables under num_gpus=0: opt in to its future default
        # (leave CUDA_VISIBLE_DEVICES alone), which is what a CPU-only run wants, and silence it
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    })
    return env


def _flwr_bin(name: str) -> str:
    """Path of a Flower console script installed beside this Python."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@dataclass
class RunOutcome:
    """How a run ended: its id, final status, status details and wall time."""

    run_id: int
    status: str
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the run finished and completed."""
        return self.status == "finished:completed"


class LocalSuperLink:
    """A private SuperLink on loopback; use as a context manager.

    ``simulation=True`` (default): Flower's simulation engine runs the ClientApps.
    ``simulation=False``: a deployment SuperLink; :meth:`add_supernodes` starts SuperNodes
    as separate processes on loopback (a local stand-in for real sites). With ``certs`` every
    connection (SuperNodes, the ``flwr`` CLI) uses TLS under that CA; with ``supernode_auth``
    only SuperNodes whose public key was registered (:meth:`register`) may connect.
    """

    def __init__(self, log_path: Path, startup_timeout: float = 60.0, simulation: bool = True,
                 certs: Certificates | None = None, supernode_auth: bool = False, database: Path | None = None) -> None:
        if supernode_auth and certs is None:
            raise SimulationError("SuperNode authentication needs TLS (certs)")
        self.simulation = simulation
        self.certs, self.supernode_auth = certs, supernode_auth
        self.database = database  # Flower's state (runs, registered nodes) in a file: a restart keeps it
        self.node_logs: list[Path] = []
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.home = Path(tempfile.mkdtemp(prefix="fedsilo-flwr-"))
        self.port = free_port()
        self.env = flower_env(self.home)
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def address(self) -> str:
        """The SuperLink's address on this machine."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, write the connection into FLWR_HOME, wait until healthy."""
        connection: dict[str, Any] = {"address": self.address}
        if self.certs is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.certs.ca_cert.resolve())
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        if self.certs is None:
            security = ["--insecure"]
        else:
            security = ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                        "--ssl-keyfile", str(self.certs.server_key)]
        cmd = [
            _flwr_bin("flower-superlink"), *security, *(["--enable-supernode-auth"] if self.supernode_auth else []),
            *(["--simulation"] if self.simulation else []),
            "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
            *(["--database", str(self.database)] if self.database is not None else []),
        ]
        self.process = subprocess.Popen(
            cmd, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimulationError(
                    f"flower-superlink exited with code {self.process.returncode}; see {self.log_path}"
                )
            if self._healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise SimulationError(f"flower-superlink not healthy after {self.startup_timeout:.0f}s; see {self.log_path}")

    def add_supernodes(self, node_configs: list[str], private_keys: list[Path] | None = None,
                       insecure: bool | None = None, worker: bool = True) -> list[subprocess.Popen[bytes]]:
        """Start one SuperNode per node config (e.g. ``'data-path="/x/site-0.npz"'``).

        ``private_keys[i]`` authenticates node ``i`` (``--enable-supernode-auth``); nodes use
        TLS with this SuperLink's CA unless ``insecure`` (default: insecure iff no certs).
        Each node logs to ``supernode-<i>.log`` beside the SuperLink's log. ``worker`` (the
        default): Flower's SuperNode through :mod:`app.runtime.supernode`, with the site's
        long-lived ClientApp worker; ``worker=False``: Flower's stock ``flower-supernode``
        binary, a new ClientApp process per message (benchmarks compare the two).
        """
        if self.simulation:
            raise SimulationError("SuperNodes belong to a deployment SuperLink (simulation=False)")
        insecure = self.certs is None if insecure is None else insecure
        started = []
        for i, node_config in enumerate(node_configs):
            n = len(self.supernodes)
            security = ["--insecure"] if insecure else ["--root-certificates", str(self.certs.ca_cert)]  # type: ignore[union-attr]
            auth = ["--auth-supernode-private-key", str(private_keys[i])] if private_keys else []
            log_path = self.log_path.with_name(f"supernode-{n}.log")
            self.node_logs.append(log_path)
            with open(log_path, "ab") as log_file:
                launcher = [sys.executable, "-m", "app.runtime.supernode", "--worker"] if worker else \
                    [_flwr_bin("flower-supernode")]
                proc = subprocess.Popen(
                    [*launcher, *security, *auth, "--superlink", self.address,
                     "--port", str(free_port()), "--node-config", node_config, "--max-retries", "20"],
                    env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            self.supernodes.append(proc)
            started.append(proc)
        return started

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with this SuperLink; return its node id."""
        proc = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        try:
            reply = json.loads(proc.stdout)
        except json.JSONDecodeError:
            reply = {}
        if proc.returncode != 0 or not reply.get("success", False):
            raise SimulationError(f"flwr supernode register {public_key} failed: {(proc.stdout + proc.stderr).strip()[-1000:]}")
        return int(reply.get("node-id", 0))

    def connected_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls`` as a list of nodes (id, status, ...)."""
        proc = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            return list(json.loads(proc.stdout).get("nodes", []))
        except json.JSONDecodeError:
            return []

    def _healthy(self) -> bool:
        try:
            if self.certs is None:
                url, context = f"http://{self.address}/health", None
            else:
                url, context = f"https://{self.address}/health", ssl.create_default_context(cafile=str(self.certs.ca_cert))
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def own_processes(self) -> list[int]:
        """PIDs of live processes started under this SuperLink's private FLWR_HOME.

        Ray starts some workers in sessions of their own, out of reach of ``killpg``; the
        unique ``FLWR_HOME`` in their environment still identifies them.
        """
        needle = f"FLWR_HOME={self.home}\0".encode()
        pids = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        return [p for p in pids if p != os.getpid()]

    def kill(self) -> None:
        """SIGKILL the SuperLink's process group (the SuperLink and the ServerApp it runs): a
        coordinator that dies. The SuperNodes keep running and retry; :meth:`start` brings the
        SuperLink back on the same port (with ``database``, with the same registered nodes)."""
        if self.process is not None:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait()
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, grace: float = 15.0) -> None:
        """Stop the SuperLink, its SuperNodes and every process they started (SIGTERM, then SIGKILL)."""
        for node in self.supernodes:
            _signal_group(node, signal.SIGTERM)
        for node in self.supernodes:
            end_group(node, grace)
        self.supernodes = []
        if self.process is not None:
            end_group(self.process, grace)
        deadline = time.monotonic() + grace
        while (stragglers := self.own_processes()) and time.monotonic() < deadline:
            for pid in stragglers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        shutil.rmtree(self.home, ignore_errors=True)

    # ---- the flwr CLI against this SuperLink ------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` command against this SuperLink; its completed process."""
        return subprocess.run(
            [_flwr_bin("flwr"), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def submit(self, app_dir: Path, run_config: dict[str, Any], federation: dict[str, Any]) -> int:
        """``flwr run`` the app; return the run id."""
        cfg_file = self.home / "run_config.toml"
        cfg_file.write_text(tomli_w.dumps(run_config))
        fed = " ".join(f"{k}={json.dumps(v)}" for k, v in federation.items())
        proc = self.flwr("run", str(app_dir), CONNECTION, "--run-config", str(cfg_file),
                         *(["--federation-config", fed] if fed else []), "--format", "json")
        try:
            reply = json.loads(proc.stdout)
        except json.JSONDecodeError:
            reply = {}
        if proc.returncode != 0 or not reply.get("success"):
            raise SimulationError(f"flwr run failed: {(proc.stdout + proc.stderr).strip()[-2000:]}")
        return int(reply["run-id"])

    def logs(self, run_id: int) -> str:
        """The run's log so far (the ServerApp's and Flower's lines), from ``flwr log --show``."""
        proc = self.flwr("log", str(run_id), CONNECTION, "--show")
        return proc.stdout + proc.stderr

    def wait_for_log(self, run_id: int, text: str, timeout: float, poll: float = 2.0) -> bool:
        """Poll the run's log until ``text`` appears; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs(run_id):
                return True
            time.sleep(poll)
        return False

    def status(self, run_id: int) -> tuple[str, str]:
        """(status, status details) of a run, from ``flwr ls --format json``."""
        proc = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            run = json.loads(proc.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            return "unknown", (proc.stdout + proc.stderr).strip()[-500:]
        return str(run.get("status", "unknown")), str(run.get("status-details", ""))

    def follow(self, run_id: int, timeout: float, stream: bool = True, poll: float = 3.0) -> RunOutcome:
        """Follow the run until it ends (its log streamed to stdout if ``stream``); return its final status.

        One ``flwr log --stream`` process follows the run either way (its end is the run's): each ``flwr ls`` is a
        Python process of about 2 CPU-seconds, so the status is asked when the stream ends, or every ``5 * poll``
        seconds while it lasts (``poll`` seconds apart if the stream process is gone)."""
        t0 = time.monotonic()
        logs = subprocess.Popen([_flwr_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                                env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if stream else subprocess.DEVNULL,
                                stderr=None if stream else subprocess.DEVNULL, start_new_session=True)
        if stream:
            threading.Thread(target=_relay_log, args=(logs.stdout,), daemon=True).start()
        try:
            status, details = "unknown", ""
            while time.monotonic() - t0 < timeout:
                if logs.poll() is None:
                    try:  # the stream ends when the run does; then ask for the status
                        logs.wait(timeout=poll * 5)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(poll)
                status, details = self.status(run_id)
                if status.startswith(FINAL_PREFIX):
                    break
            else:
                self.flwr("stop", str(run_id), CONNECTION)
                status, details = "timeout", f"run did not finish within {timeout:.0f}s"
        finally:
            end_group(logs, grace=10.0)
        return RunOutcome(run_id, status, details, time.monotonic() - t0)


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with ``start_new_session``)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM ``proc``'s group, wait ``grace`` seconds, then SIGKILL the group and reap ``proc``.

    Never raises: it runs while a run unwinds (Ctrl-C, ``kill``), where an exception would replace
    the exit the user asked for (a SIGTERM'd ``fedsilo`` must end with 143, not 1)."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # what is left of the group (children that outlived their leader too)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # unkillable (D state): leave it to the straggler sweep
        pass


#: A deployed ServerApp's log reaches ``flwr log`` twice: as the console line and again in
#: Flower's file format (``11/22/2026 10:39:00:INFO:...``); the second copy is dropped.
_FILE_FORMAT_LINE = re.compile(rb"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")


#: Flower's notices a fedsilo user cannot act on: fedsilo sets the number of simulated SuperNodes itself.
_NOT_ACTIONABLE = (b"default simulated SuperNodes changed", b"To change federation size",
                   b"flwr federation simulation-config", b"Manually terminating ClientAppActor")


def _relay_log(pipe: Any) -> None:
    """Copy a ``flwr log --stream`` to stdout, without the duplicate file-format lines and without
    Flower's notices that do not apply to a fedsilo run (:data:`_NOT_ACTIONABLE`)."""
    for line in iter(pipe.readline, b""):
        if not _FILE_FORMAT_LINE.match(line) and not any(n in line for n in _NOT_ACTIONABLE):
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()


def run_simulation(
    app_dir: Path,
    run_config: dict[str, Any],
    num_supernodes: int,
    log_path: Path,
    extra_federation: dict[str, Any] | None = None,
    timeout: float = 4 * 3600,
    stream: bool = True,
) -> RunOutcome:
    """Start a private SuperLink, run the app on ``num_supernodes`` simulated nodes, stop it."""
    federation: dict[str, Any] = {"num-supernodes": num_supernodes, "client-resources-num-cpus": 1}
    federation.update(extra_federation or {})
    with LocalSuperLink(log_path) as link:
        run_id = link.submit(app_dir, run_config, federation)
        return link.follow(run_id, timeout=timeout, stream=stream)

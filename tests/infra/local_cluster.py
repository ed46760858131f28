"""A two-node Ray cluster on one machine, started with `ray start` in subprocesses, for job-submission tests.

Nothing here calls `ray.init`: the cluster lives in its own processes, temp dir, ports and auth token, apart
from the in-process Ray other tests use. Every process it starts (and everything those start: raylets,
workers, job drivers) carries a unique marker in its environment, so `stop()` can find and end exactly those
processes by pid, even when a node or a job was left half-started by a failure.

Addresses: the dashboard / job API binds 127.0.0.1. Ray 2.60 replaces `--node-ip-address 127.0.0.1` with the
machine's own address (it refuses loopback as a node IP) and its core services listen on all interfaces,
as everywhere in Ray; token auth (a random token per cluster) stays on, so nothing is reachable without it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

MARKER_VAR = "LIDIT_TEST_CLUSTER"
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `MARKER_VAR=marker` (ours only)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


class LocalRayCluster:
    """Head (`--num-cpus head_cpus`, resource `head_node`) + one worker node (resource `worker_node`).

    The head runs no Ray tasks by default (`head_cpus=0`, as on a production cluster): job drivers run there,
    all CPU work goes to the worker. Dashboard/job API on 127.0.0.1; Ray's token auth stays on.
    """

    def __init__(self, head_cpus: float = 0, worker_cpus: float = 2, startup_tries: int = 3) -> None:
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.startup_tries = startup_tries
        # Short path: Ray's Unix sockets live under it and sun_path is limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="lidit-mn-", dir="/tmp"))
        self.marker = secrets.token_hex(8)
        self.token = secrets.token_hex(16)
        # Nothing of the caller's Ray/LIDiT/MLflow setup leaks in: jobs get theirs through runtime_env.
        dropped = ("RAY_", "LIDIT_", "MLFLOW_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        self.env.update(
            {
                MARKER_VAR: self.marker,
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token,
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = self.dashboard_port = 0
        self.head_node_id = self.worker_node_id = ""

    # ---- HTTP (dashboard / job / state API) ----

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def get(
        self, path: str, params: dict[str, Any] | list[tuple[str, Any]] | None = None, timeout: float = 10
    ) -> Any:
        url = self.address + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict[str, Any]]:
        data = self.get("/api/v0/nodes", {"detail": "true", "limit": 100})
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def job(self, submission_id: str) -> dict[str, Any]:
        return self.get(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self.get(f"/api/jobs/{submission_id}/logs")["logs"]

    def tasks(self, job_id: str) -> list[dict[str, Any]]:
        params = [("limit", 10000), ("detail", "true")]
        params += [("filter_keys", "job_id"), ("filter_predicates", "="), ("filter_values", job_id)]
        return self.get("/api/v0/tasks", params, timeout=30)["data"]["result"]["result"]

    # ---- lifecycle ----

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.root / log, "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [RAY, "start", "--block", *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def _wait(self, proc: subprocess.Popen, nodes: int, deadline: float) -> bool:
        """True once `nodes` nodes are alive; False if `proc` exited first (a startup failure)."""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if len(self.alive_nodes()) >= nodes:
                    return True
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray node did not come up; logs in {self.root}")

    def _start_head(self, deadline: float) -> None:
        for _ in range(self.startup_tries):
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            proc = self._spawn(
                [
                    "--head",
                    "--port", str(self.gcs_port),
                    "--node-ip-address", "127.0.0.1",
                    "--num-cpus", str(self.head_cpus),
                    "--resources", json.dumps({"head_node": 1}),
                    "--include-dashboard=true",
                    "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(self.dashboard_port),
                    "--dashboard-agent-listen-port", str(free_port()),
                    "--ray-client-server-port", str(free_port()),
                    "--object-store-memory", str(100 * 10**6),
                    "--temp-dir", str(self.root / "head"),
                    "--disable-usage-stats",
                ],
                "head.log",
            )  # fmt: skip
            if self._wait(proc, 1, deadline):
                return
            # On a loaded machine the raylet can miss Ray's fixed 30 s registration window: try again.
            self._kill_proc(proc)
        raise RuntimeError(f"Ray head failed to start {self.startup_tries} times; see {self.root}/head.log")

    def _start_worker(self, deadline: float) -> None:
        for _ in range(self.startup_tries):
            proc = self._spawn(
                [
                    "--address", f"127.0.0.1:{self.gcs_port}",
                    "--node-ip-address", "127.0.0.1",
                    "--num-cpus", str(self.worker_cpus),
                    "--resources", json.dumps({"worker_node": 1}),
                    "--dashboard-agent-listen-port", str(free_port()),
                    "--object-store-memory", str(100 * 10**6),
                    "--temp-dir", str(self.root / "worker"),
                    "--disable-usage-stats",
                ],
                "worker.log",
            )  # fmt: skip
            if self._wait(proc, 2, deadline):
                return
            self._kill_proc(proc)
        raise RuntimeError(
            f"Ray worker failed to start {self.startup_tries} times; see {self.root}/worker.log"
        )

    def start(self, timeout: float = 300) -> LocalRayCluster:
        deadline = time.monotonic() + timeout
        try:
            self._start_head(deadline)
            self._start_worker(deadline)
            for node in self.alive_nodes():
                if node["is_head_node"]:
                    self.head_node_id = node["node_id"]
                elif "worker_node" in (node.get("resources_total") or {}):
                    self.worker_node_id = node["node_id"]
            assert self.head_node_id and self.worker_node_id, self.alive_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def _kill_proc(self, proc: subprocess.Popen, grace: float = 10) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its session (gcs, raylet, agents)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> list[int]:
        """Stop both nodes and every process carrying this cluster's marker; returns pids that needed SIGKILL."""
        for proc in reversed(self.procs):  # worker first, then head
            self._kill_proc(proc)
        stragglers = marked_pids(self.marker)  # workers / job drivers in their own sessions
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while marked_pids(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        return stragglers

    def cleanup_files(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- jobs ----

    def submit(
        self,
        entrypoint: list[str],
        working_dir: str | Path,
        runtime_env: dict[str, Any] | None = None,
        timeout: float = 600,
    ) -> tuple[str, subprocess.CompletedProcess]:
        """`ray job submit --working-dir DIR -- ENTRYPOINT`, waiting for the end; returns (submission id, CLI run)."""
        sid = f"lidit-test-{secrets.token_hex(4)}"
        cmd = [RAY, "job", "submit", "--address", self.address, "--submission-id", sid]
        cmd += ["--working-dir", str(working_dir)]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        cmd += ["--", *entrypoint]
        try:
            run = subprocess.run(
                cmd, env=self.env, cwd=working_dir, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            subprocess.run(
                [RAY, "job", "stop", "--address", self.address, sid],
                env=self.env,
                capture_output=True,
                timeout=60,
            )
            raise
        return sid, run

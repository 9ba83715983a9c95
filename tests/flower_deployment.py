"""A loopback Flower deployment for the tests: one SuperLink, N SuperNodes, `flwr run`.

Every process starts in its own process group and is killed as a group (with any descendant
that left it) when the deployment closes, also when a test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fl_core.flower import FLOWER_ENV
from fl_core.flower.deploy import make_supernode_keys, make_tls_certificates, write_connection

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackDeployment:
    """SuperLink with TLS and SuperNode authentication, SuperNodes holding one partition each."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "flwr-home"
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home)}
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.port = free_port()
        self.certs = make_tls_certificates(root / "certs")
        write_connection(self.home, "loopback", f"127.0.0.1:{self.port}", self.certs["ca"])

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(
            args,
            stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
            start_new_session=True,  # its own process group, killed as one
        )
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        c = self.certs
        self._start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(c["ca"]),
                "--ssl-certfile",
                str(c["cert"]),
                "--ssl-keyfile",
                str(c["key"]),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        self._wait_for_port(self.port, "superlink")

    def _wait_for_port(self, port: int, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.logs[name].read_text()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{name} did not open port {port}")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )

    def start_supernode(self, partition_id: int, data_path: Path) -> None:
        name = f"supernode{partition_id}"
        keys = make_supernode_keys(self.root / "keys", name)
        reg = self.flwr("supernode", "register", str(keys["public"]), "loopback")
        if reg.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {reg.stdout}{reg.stderr}")
        self._start(
            name,
            [
                str(BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(self.certs["ca"]),
                "--auth-supernode-private-key",
                str(keys["private"]),
                "--node-config",
                f'partition-id={partition_id} data-path="{data_path}"',
                "--port",
                str(free_port()),
            ],
        )

    def run_app(self, app_dir: Path, timeout: float = 600.0) -> subprocess.CompletedProcess:
        return self.flwr("run", str(app_dir), "loopback", "--stream", timeout=timeout)

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        group = []
        try:
            group = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in group:  # descendants that started a session of their own
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)

"""Start the servers under test, pinned to cores, and read their /proc figures."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml
from support.processes import ProcessStartError, free_port, read_text, stop_process
from support.upstream import ProxySettings, RegistryUpstream

from bench.client import Connection, Target

READY_TIMEOUT = 30.0
READY_POLL = 0.01


class QuietRegistry(RegistryUpstream):
    """docker-registry logging warnings only, optionally pinned to CPUs.

    The anchor runs as its best case: no access log, nothing below warn.
    """

    def __init__(
        self, workdir: Path, cpus: str = "", quiet: bool = True, **options: Any
    ):
        super().__init__(workdir, **options)
        self.cpus = cpus
        self.quiet = quiet

    def config(self) -> dict[str, Any]:
        """Return docker-registry's config, with logging turned down when quiet."""
        config = super().config()
        if self.quiet:
            config["log"] = {"level": "warn", "accesslog": {"disabled": True}}
        return config

    def _launch(self, binary: str, timeout: float) -> None:
        if self.cpus:
            wrapper = self.workdir / "pinned-registry.sh"
            wrapper.write_text(
                f'#!/bin/sh\nexec taskset -c {self.cpus} {shlex.quote(binary)} "$@"\n'
            )
            wrapper.chmod(0o755)
            binary = str(wrapper)
        super()._launch(binary, timeout)

    @property
    def pid(self) -> int:
        """Return the process id of the running registry."""
        assert self.process is not None
        return self.process.pid

    def target(self) -> Target:
        """Return how clients address this registry: plain /v2/<repo>/."""
        return Target(self.address, self.port, "/v2/")


def start_upstream(workdir: Path) -> QuietRegistry:
    """Start the upstream docker-registry on 127.0.0.1, with its access log."""
    return QuietRegistry(workdir, quiet=False, port=0).start()  # type: ignore[return-value]


def start_anchor(workdir: Path, upstream: RegistryUpstream, cpus: str) -> QuietRegistry:
    """Start docker-registry as a pull-through cache of the upstream."""
    anchor = QuietRegistry(
        workdir, cpus=cpus, port=0, proxy=ProxySettings(remote_url=upstream.url)
    )
    return anchor.start()  # type: ignore[return-value]


class OurServer:
    """Our server as a subprocess pinned to CPUs, on a fresh port."""

    def __init__(
        self,
        command: Sequence[str],
        workdir: Path,
        image_path: Path,
        upstream: RegistryUpstream,
        cpus: str = "",
        workers: int = 1,
    ) -> None:
        self.command = list(command)
        self.workdir = workdir
        self.image_path = image_path
        self.upstream = upstream
        self.cpus = cpus
        self.workers = workers
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_path = workdir / "ociregistry.stderr"
        self._stderr: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """Return the process id of the server (the parent when forked)."""
        assert self.process is not None
        return self.process.pid

    def target(self) -> Target:
        """Return how clients address this server: in-path upstream."""
        return Target(self.host, self.port, f"/v2/{self.upstream.host_port}/")

    def argv(self) -> list[str]:
        """Return the command line: taskset, the server, its options."""
        config = self.workdir / "ociregistry.yml"
        settings: dict[str, Any] = {
            "registries": [{"name": self.upstream.host_port, "scheme": "http"}]
        }
        if self.workers > 1:
            settings["workers"] = self.workers
        config.write_text(yaml.safe_dump(settings))
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        return [
            *pin,
            *self.command,
            "--image-path",
            str(self.image_path),
            "--config-file",
            str(config),
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]

    def launch(self) -> float:
        """Start the process; return the monotonic time it was started at."""
        assert self.process is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        self._stderr = self.stderr_path.open("ab")
        started = time.monotonic()
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=self.workdir,
        )
        return started

    def start(self) -> OurServer:
        """Start the server and wait until `GET /v2/` answers 200."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, path: str = "/v2/", timeout: float = READY_TIMEOUT) -> None:
        """Poll a path until it answers 200; raise if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                raise ProcessStartError(f"ociregistry exited:\n{self.read_log()}")
            if answers_200(self.host, self.port, path):
                return
            if time.monotonic() > deadline:
                raise ProcessStartError(f"ociregistry not ready:\n{self.read_log()}")
            time.sleep(READY_POLL)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def read_log(self) -> str:
        """Return what the server wrote (banner, logs)."""
        return read_text(self.stderr_path)[-3000:]


def answers_200(host: str, port: int, path: str) -> bool:
    """Tell whether a GET of the path answers 200 right now."""
    connection = Connection(host, port, timeout=2.0)
    try:
        return connection.request("GET", path, {"Accept": "*/*"}).status == 200
    except OSError:
        return False
    finally:
        connection.close()


def process_tree(pid: int) -> list[int]:
    """Return the pid and every descendant's pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = read_text(Path(f"/proc/{entry}/stat"))
            parent = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, pending = [], [pid]
    while pending and len(found) < 1000:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """Return utime + stime of the processes, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = read_text(Path(f"/proc/{pid}/stat")).rsplit(")", 1)[-1].split()
        if len(fields) > 12:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def peak_rss_mb(pids: Sequence[int]) -> float:
    """Return the sum of VmHWM (peak resident set) of the processes, in MB."""
    total_kb = 0
    for pid in pids:
        for line in read_text(Path(f"/proc/{pid}/status")).splitlines():
            if line.startswith("VmHWM:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Restart VmHWM from the current RSS (writes 5 to clear_refs)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as file:
                file.write("5")
        except OSError:
            pass


def is_listening(host: str, port: int) -> bool:
    """Tell whether something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False

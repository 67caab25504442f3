"""Start, wait for and stop server subprocesses; our server's test harness."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import urllib3
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


class ProcessStartError(RuntimeError):
    """Raised when a server process exits or stays unready while starting."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def is_port_free(host: str, port: int) -> bool:
    """Tell whether a listener could bind `host:port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Go and gevent listeners set SO_REUSEADDR, so a port whose old
        # connections linger in TIME_WAIT is free for them too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str = "condition",
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll `predicate` until it holds; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.1f} s")
        time.sleep(interval)


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT
) -> int:
    """Send SIGTERM, wait up to `timeout` s, then SIGKILL; return the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout)


def read_text(path: Path) -> str:
    """Return a log file's text, or "" when it does not exist yet."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class OciServer:
    """Our server as a subprocess on a free loopback port, for end-to-end tests.

    Its stdout and stderr go to files in `workdir` that tests may read while
    it runs; `stop` and `restart` keep the port, so URLs stay valid.
    """

    def __init__(
        self,
        image_path: Path,
        workdir: Path,
        args: Sequence[str] = (),
        global_args: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        log_level: str | None = "info",
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] = (sys.executable, "-m", "ociregistry"),
        client_cert: tuple[str, str] | None = None,
    ):
        self.image_path = Path(image_path)
        self.workdir = Path(workdir)
        self.args = list(args)
        self.global_args = list(global_args)
        self.config = config
        self.log_level = log_level
        self.host = host
        self.port = port or free_port(host)
        self.env = dict(env or {})
        self.command = list(command)
        self.client_cert = client_cert
        is_tls = bool(config and config.get("serverTlsConfig"))
        self.scheme = "https" if is_tls else "http"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stderr_path = self.workdir / f"ociregistry-{self.port}.stderr"
        self.stdout_path = self.workdir / f"ociregistry-{self.port}.stdout"
        self.config_path = self.workdir / f"ociregistry-{self.port}.yml"
        self._files: list[IO[bytes]] = []

    @property
    def url(self) -> str:
        """Return the base URL, without a trailing slash."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """Return `host:port` as image references name this server."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """Return the process id of the running server."""
        assert self.process is not None, "server not started"
        return self.process.pid

    def argv(self) -> list[str]:
        """Return the full command line the server is started with."""
        argv = [*self.command, "--image-path", str(self.image_path)]
        if self.log_level:
            argv += ["--log-level", self.log_level]
        if self.config is not None:
            argv += ["--config-file", str(self.config_path)]
        argv += self.global_args
        argv += ["serve", "--host", self.host, "--port", str(self.port)]
        return argv + self.args

    def start(self, timeout: float = READY_TIMEOUT) -> OciServer:
        """Start the server and wait until `GET /v2/` answers 200."""
        assert self.process is None, "server already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            self.config_path.write_text(yaml.safe_dump(dict(self.config)))

        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])
        )
        stdout = self.stdout_path.open("ab")
        stderr = self.stderr_path.open("ab")
        self._files = [stdout, stderr]
        self.process = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=self.workdir,
        )
        self.starts += 1

        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll `GET /v2/` until it answers 200; raise if the process exits."""
        pool = self.client(timeout=1.0)
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll() if self.process else None
            if code is not None:
                raise ProcessStartError(
                    f"ociregistry exited with {code} while starting: "
                    f"{' '.join(self.argv())}\n{self.read_stderr()}"
                )
            try:
                if pool.request("GET", self.url + "/v2/").status == 200:
                    return
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise ProcessStartError(
                    f"ociregistry not ready within {timeout:.0f} s on {self.url}\n"
                    f"{self.read_stderr()}"
                )
            time.sleep(POLL_INTERVAL)

    def client(self, timeout: float = 10.0) -> urllib3.PoolManager:
        """Return a pool for this server: https unverified, with `client_cert`."""
        if self.scheme == "http":
            return urllib3.PoolManager(retries=False, timeout=timeout)
        cert_file, key_file = self.client_cert or (None, None)
        return urllib3.PoolManager(
            retries=False,
            timeout=timeout,
            cert_reqs="CERT_NONE",
            assert_hostname=False,
            cert_file=cert_file,
            key_file=key_file,
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL) and return its exit code."""
        code = None
        if self.process is not None:
            code = stop_process(self.process, timeout)
            self.process = None
        for file in self._files:
            file.close()
        self._files = []
        return code

    def restart(self, timeout: float = READY_TIMEOUT) -> OciServer:
        """Stop the server and start it again on the same port and cache root."""
        self.stop()
        return self.start(timeout)

    def is_running(self) -> bool:
        """Tell whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def read_stderr(self) -> str:
        """Return everything the server wrote to stderr (banner and logs)."""
        return read_text(self.stderr_path)

    def read_stdout(self) -> str:
        """Return everything the server wrote to stdout."""
        return read_text(self.stdout_path)

    def read_log(self) -> str:
        """Return stderr, or the `--log-file` when the server was given one."""
        if "--log-file" in self.global_args:
            index = self.global_args.index("--log-file")
            return read_text(self.workdir / self.global_args[index + 1])
        return self.read_stderr()

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the log contains `text`; return the whole log."""
        wait_until(lambda: text in self.read_log(), timeout, f"log line {text!r}")
        return self.read_log()

    def __enter__(self) -> OciServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServerFactory:
    """Start `OciServer`s for one test and stop every one of them afterwards."""

    def __init__(self, workdir: Path, default_image_path: Path):
        self.workdir = workdir
        self.default_image_path = default_image_path
        self.servers: list[OciServer] = []
        self._lock = threading.Lock()

    def __call__(
        self, *args: str, image_path: Path | None = None, **options: Any
    ) -> OciServer:
        """Start a server with serve `args`; options go to `OciServer`."""
        server = OciServer(
            image_path or self.default_image_path, self.workdir, args, **options
        )
        with self._lock:
            self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        """Stop every server this factory started."""
        with self._lock:
            servers, self.servers = self.servers, []
        for server in servers:
            server.stop()

"""The server lifecycle: start-up banner, serving /v2/, stopping on signals."""

from __future__ import annotations

import datetime
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import REPO_ROOT, ServerFactory, free_port, wait_until

from ociregistry.config import ServerTlsSettings, Settings
from ociregistry.server import describe_tls, format_banner

STOP_BOUND = 8.0  # seconds a stop may take in these tests (the drain is 10)

# A server whose registry is a tiny WSGI app: /slow answers after a second,
# /stop asks the server to stop, as the /cmd/stop endpoint does.
SLOW_SERVER = """
from gevent import monkey

monkey.patch_all()

import pathlib
import sys

import gevent

from ociregistry.configfile import load_settings
from ociregistry.server import serve

marker = pathlib.Path(sys.argv[2])


class SlowRegistry:
    def __init__(self, settings, request_stop):
        self.request_stop = request_stop
        self.wsgi = self.app

    def start(self):
        pass

    def close(self):
        pass

    def app(self, environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            marker.touch()
            gevent.sleep(1.0)
        if environ["PATH_INFO"] == "/stop":
            self.request_stop()
        start_response("200 OK", [("Content-Length", "4")])
        return [b"done"]


settings = load_settings("", {"port": int(sys.argv[1]), "host": "127.0.0.1"})
sys.exit(serve(settings, registry_factory=SlowRegistry))
"""


def python_env() -> dict[str, str]:
    """Return an environment in which `python -m ociregistry` finds this tree."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """Start the SLOW_SERVER script; yield it, its port and its marker file."""
    script, marker, port = tmp_path / "slow.py", tmp_path / "slow-started", free_port()
    script.write_text(SLOW_SERVER)
    process = subprocess.Popen(
        [sys.executable, str(script), str(port), str(marker)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        wait_until(lambda: answers(port), 10.0, "slow server listening")
        yield process, port, marker
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def answers(port: int) -> bool:
    """Tell whether something accepts TCP connections on the loopback port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_exit(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> float:
    """Wait for a process to exit; return how long it took."""
    started = time.monotonic()
    process.wait(timeout=STOP_BOUND)
    return time.monotonic() - started


def test_serve_answers_v2_and_prints_the_banner(oci_server: ServerFactory) -> None:
    server = oci_server()

    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    connection.request("GET", "/v2/")
    status = connection.getresponse().status
    connection.close()
    code = server.stop()

    assert status == 200
    assert code == 0
    banner = server.read_stderr().splitlines()[:9]
    assert banner[0] == banner[8] == "-" * 70
    assert banner[1] == (
        "OCI Registry: pull-only, pull-through, caching OCI Distribution Server"
    )
    assert banner[2].startswith("Version: ")
    assert ", build date: " in banner[2]
    assert banner[3].startswith("Started: ")
    assert banner[3].endswith(f" (port {server.port})")
    assert banner[4] == f"Running as (uid:gid) {os.getuid()}:{os.getgid()}"
    assert banner[5].startswith("Process id: ")
    assert banner[6] == "Tls: none"
    assert banner[7].startswith("Command line: ")
    assert banner[7].endswith(" ".join(server.argv()[3:]))


def test_server_logs_that_it_is_running(oci_server: ServerFactory) -> None:
    server = oci_server()

    log = server.wait_for_log("server is running")

    assert "INFO[0" in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_with_status_0(
    oci_server: ServerFactory, signum: signal.Signals
) -> None:
    server = oci_server()
    assert server.process is not None

    server.process.send_signal(signum)
    seconds = wait_exit(server.process)

    assert server.process.returncode == 0
    assert seconds < STOP_BOUND
    assert f"stopping: received {signum.name}" in server.read_stderr()


def test_idle_keep_alive_connection_does_not_hold_the_stop(
    oci_server: ServerFactory,
) -> None:
    server = oci_server()
    assert server.process is not None
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    connection.request("GET", "/v2/")
    connection.getresponse().read()

    try:
        server.process.send_signal(signal.SIGTERM)
        seconds = wait_exit(server.process)
    finally:
        connection.close()

    assert server.process.returncode == 0
    assert seconds < 3.0


def test_request_in_flight_finishes_before_the_stop(
    slow_server: tuple[subprocess.Popen[str], int, Path],
) -> None:
    process, port, marker = slow_server
    answer: dict[str, object] = {}

    def fetch() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/slow")
        response = connection.getresponse()
        answer.update(status=response.status, body=response.read())
        connection.close()

    client = threading.Thread(target=fetch)
    client.start()
    wait_until(marker.exists, 10.0, "slow request started")
    process.send_signal(signal.SIGTERM)
    client.join(timeout=10)
    wait_exit(process)

    assert answer == {"status": 200, "body": b"done"}
    assert process.returncode == 0


def test_stop_request_stops_the_server(
    slow_server: tuple[subprocess.Popen[str], int, Path],
) -> None:
    process, port, _marker = slow_server

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/stop")
    status = connection.getresponse().status
    connection.close()
    wait_exit(process)

    assert status == 200
    assert process.returncode == 0


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m ociregistry ARGS` that should fail to start."""
    return subprocess.run(
        [sys.executable, "-m", "ociregistry", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=python_env(),
    )


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        done = run_serve(
            "--image-path", str(tmp_path), "serve", "--host", "127.0.0.1",
            "--port", str(port),
        )  # fmt: skip

    assert done.returncode == 1
    assert done.stderr == (
        f"ociregistry: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


def test_unusable_image_path_is_one_line(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    done = run_serve(
        "--image-path", str(not_a_directory / "cache"), "serve",
        "--host", "127.0.0.1", "--port", str(free_port()),
    )  # fmt: skip

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("ociregistry: cannot start: ")
    assert "Not a directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_server_tls_with_missing_files_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("serverTlsConfig: {cert: c.pem, key: k.pem}\n")

    done = run_serve(
        "--config-file", str(config), "--image-path", str(tmp_path), "serve",
        "--host", "127.0.0.1", "--port", str(free_port()),
    )  # fmt: skip

    assert done.returncode == 1
    assert done.stderr == (
        "ociregistry: serverTlsConfig: cannot use cert c.pem with key k.pem: "
        "no such file or directory\n"
    )


def test_banner_names_version_port_and_command_line() -> None:
    settings = Settings(port=5000, command_line="bin/ociregistry serve --port 5000")
    started = datetime.datetime(2025, 9, 10, 19, 30, 24, 133946, tzinfo=datetime.UTC)

    lines = format_banner(settings, started).splitlines()

    assert lines[3] == "Started: 2025-09-10 19:30:24.133946 +0000 UTC (port 5000)"
    assert lines[6] == "Tls: none"
    assert lines[7] == "Command line: bin/ociregistry serve --port 5000"
    assert len(lines) == 9


@pytest.mark.parametrize(
    ("tls", "summary"),
    [
        (None, "none"),
        (
            ServerTlsSettings(cert="c.pem", key="k.pem"),
            "server cert c.pem, client auth none",
        ),
        (
            ServerTlsSettings(
                cert="c.pem", key="k.pem", ca="ca.pem", client_auth="verify"
            ),
            "server cert c.pem, client auth verify against ca.pem",
        ),
        (
            ServerTlsSettings(cert="c.pem", key="k.pem", client_auth="verify"),
            "server cert c.pem, client auth verify against the system trust store",
        ),
    ],
)
def test_tls_summary(tls: ServerTlsSettings | None, summary: str) -> None:
    assert describe_tls(tls) == summary

"""Graceful stop on SIGTERM: drain, refuse new connections, finish, exit 0."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading

import pytest
import urllib3
from support.fake_upstream import Stall
from support.images import make_image
from support.processes import free_port, wait_until

LAYER = 4 * 1024 * 1024
SENT_BEFORE_STOP = 1024 * 1024  # bytes the upstream sends, then stalls
FIRST_READ = 64 * 1024


@pytest.fixture
def image():
    return make_image("graceful-stop", layer_sizes=(LAYER,))


def health_status(port: int) -> int | None:
    """Return the status of GET /health, or None when nothing answers."""
    pool = urllib3.PoolManager(retries=False, timeout=5)
    try:
        return pool.request("GET", f"http://127.0.0.1:{port}/health").status
    except urllib3.exceptions.HTTPError:
        return None


def refuses_connections(host: str, port: int) -> bool:
    """Tell whether nothing accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class BlobReader(threading.Thread):
    """Download a blob through our server in the background, in two steps."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.first_bytes = threading.Event()
        self.status = 0
        self.body = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        pool = urllib3.PoolManager(retries=False, timeout=30)
        try:
            response = pool.request("GET", self.url, preload_content=False)
            self.status = response.status
            self.body = response.read(FIRST_READ)
            self.first_bytes.set()
            self.body += response.read()
        except BaseException as error:  # reported by the test
            self.error = error
        finally:
            self.first_bytes.set()


def test_sigterm_during_a_large_blob_download_lets_it_finish(
    fake_upstream, oci_server, image
):
    fake = fake_upstream()
    fake.add_image("app/big", "1", image)
    layer = image.layers[0]
    stall = fake.add_fault(
        fake.blob_path("app/big", layer.digest),
        Stall(times=1, after_bytes=SENT_BEFORE_STOP),
    )
    health = free_port()
    server = oci_server(
        "--health", str(health), config={"registries": [fake.registry_config()]}
    )
    reader = BlobReader(
        f"{server.url}/v2/{fake.namespace}/app/big/blobs/{layer.digest}"
    )
    process = server.process
    assert process is not None

    reader.start()
    assert reader.first_bytes.wait(15) and reader.error is None
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: health_status(health) == 503, 10.0, "health 503")
    wait_until(
        lambda: refuses_connections(server.host, server.port), 10.0, "port closed"
    )
    still_running = process.poll() is None
    stall.release.set()
    reader.join(30)
    code = process.wait(30)

    assert still_running
    assert reader.error is None
    assert reader.status == 200
    assert len(reader.body) == layer.size
    assert "sha256:" + hashlib.sha256(reader.body).hexdigest() == layer.digest
    assert code == 0
    log = server.read_log()
    assert "stopping: received SIGTERM" in log
    assert "server stopped" in log
    assert "Traceback" not in log


def test_sigterm_with_nothing_in_flight_exits_at_once(oci_server):
    health = free_port()
    server = oci_server("--health", str(health))
    assert health_status(health) == 200
    process = server.process
    assert process is not None

    process.send_signal(signal.SIGTERM)
    code = process.wait(10)

    assert code == 0
    assert health_status(health) is None

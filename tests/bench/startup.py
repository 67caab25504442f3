"""Start-up to serving with a large cache: write the cache, time the start."""

from __future__ import annotations

import time
from pathlib import Path

from support.images import make_image

from bench.client import ACCEPT, Connection
from bench.servers import OurServer
from ociregistry.manifest import OCI_IMAGE, Manifest, sha256_digest
from ociregistry.store import IMAGES, Store

READY_POLL = 0.01
START_TIMEOUT = 60.0


def write_cache(root: Path, upstream: str, count: int) -> str:
    """Write `count` manifest records straight into a cache root; return a URL path.

    The records are written without fsync and without the store's index,
    the way a restored backup or a cache filled by another host appears.
    """
    Store(str(root))  # creates the layout
    template = make_image("startup", layer_sizes=(1024,))
    base = template.manifest_bytes.rstrip(b"}")
    last_url = ""
    for number in range(count):
        data = base + f',\n   "annotations": {{"n": "{number}"}}\n}}'.encode()
        url = f"{upstream}/startup/image-{number % 100}:{number}"
        manifest = Manifest(sha256_digest(data), OCI_IMAGE, data, [url])
        (root / IMAGES / manifest.hex).write_bytes(manifest.to_record())
        last_url = url
    repo, _, tag = last_url.partition("/")[2].rpartition(":")
    return f"/v2/{upstream}/{repo}/manifests/{tag}"


def time_startup(server: OurServer, manifest_path: str) -> float:
    """Start the server; return seconds until /v2/ and a cached manifest answer."""
    started = server.launch()
    try:
        server.wait_ready("/v2/", START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not _serves(server, manifest_path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{manifest_path} not served:\n{server.read_log()}")
            time.sleep(READY_POLL)
        return time.monotonic() - started
    finally:
        server.stop()


def _serves(server: OurServer, path: str) -> bool:
    connection = Connection(server.host, server.port, timeout=5.0)
    try:
        response = connection.request("GET", path, {"Accept": ACCEPT})
        return response.status == 200
    except OSError:
        return False
    finally:
        connection.close()

"""A cache root on a tiny filesystem: full disks fail cleanly and recover.

The cache root is a 4 MiB tmpfs mounted by the test (root only). A pull that
does not fit must fail with a 5xx (507) or a body cut short, log why, leave
no partial entry behind, and keep serving what is cached; once space is
freed, the same pulls must work.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import urllib3
from support.cache_checks import assert_cache_sound
from support.images import make_image, raw_image
from support.processes import wait_until

MIB = 1024 * 1024
TMPFS_SIZE = "4m"
REPO = "app/disk"


@pytest.fixture
def cache_root(tmp_path):
    """The cache root, on a 4 MiB tmpfs of its own (overrides conftest's)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "cache"
    root.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(root)]
    result = subprocess.run(mount, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    yield root
    # oci_server depends on this fixture, so its servers are stopped by now.
    subprocess.run(["umount", str(root)], check=True)


def fill_disk(root: Path, leave: int = 0) -> Path:
    """Fill the filesystem with a file, then give `leave` bytes back."""
    filler = root / "filler"
    chunk = b"\0" * (64 * 1024)
    with open(filler, "ab", buffering=0) as file:
        try:
            while True:
                file.write(chunk)
        except OSError:
            pass
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


def get(server, fake, path):
    client = urllib3.PoolManager(retries=False, timeout=30)
    url = f"{server.url}/v2/{fake.host_port}/{REPO}/{path}"
    return client.request("GET", url, preload_content=False)


def read_whole(response) -> bytes | None:
    """Return a 200 body that arrived in full, else None."""
    try:
        data = response.read()
    except urllib3.exceptions.HTTPError:
        return None
    if response.status != 200:
        return None
    return data if len(data) == int(response.headers["Content-Length"]) else None


def assert_nothing_partial(root: Path) -> None:
    """Check the cache verifies and, once downloads settle, .tmp is empty."""
    temp = root / ".tmp"
    wait_until(lambda: not any(temp.iterdir()), 10, "temporary files removed")
    assert_cache_sound(root)


def wait_for_blobs(root: Path, image) -> None:
    """Wait until the background pull of an image's blobs has cached them."""
    paths = [root / "blobs" / blob.hex for blob in image.blobs]
    wait_until(lambda: all(path.exists() for path in paths), 10, "blobs cached")
    assert_nothing_partial(root)


@pytest.fixture
def disk_server(oci_server, fake_upstream, cache_root):
    fake = fake_upstream()
    server = oci_server(config={"registries": [fake.registry_config()]})
    return server, fake


def test_blob_that_does_not_fit_fails_and_pulls_work_once_space_is_freed(
    disk_server, cache_root
):
    server, fake = disk_server
    small = make_image("disk-small", layer_sizes=(64 * 1024, 4096))
    big = raw_image("disk-big", [3 * MIB])
    fake.add_image(REPO, "small", small)
    fake.add_image(REPO, "big", big)
    for blob in small.blobs:
        assert read_whole(get(server, fake, f"blobs/{blob.digest}")) == blob.data
    filler = fill_disk(cache_root, leave=2 * MIB)
    assert read_whole(get(server, fake, "manifests/big")) == big.bytes
    layer = big.layers[0]

    failed = get(server, fake, f"blobs/{layer.digest}")
    body = read_whole(failed)

    assert body is None
    if failed.status != 200:
        assert failed.status == 507
        assert "no space left" in json.loads(failed.data)["errors"][0]["message"]
    log = server.wait_for_log("no space left in the cache root")
    assert "Traceback" not in log
    assert not (cache_root / "blobs" / layer.hex).exists()
    assert_nothing_partial(cache_root)
    for blob in small.blobs:
        assert read_whole(get(server, fake, f"blobs/{blob.digest}")) == blob.data

    filler.unlink()
    assert read_whole(get(server, fake, f"blobs/{layer.digest}")) == layer.data
    assert (cache_root / "blobs" / layer.hex).exists()
    assert_nothing_partial(cache_root)


@pytest.mark.parametrize("free", [0, 8 * 1024], ids=["full", "nearly-full"])
def test_manifest_that_does_not_fit_is_507_and_not_half_written(
    disk_server, cache_root, free
):
    server, fake = disk_server
    cached = make_image("disk-cached")
    # Many layers make a manifest record several pages long, so that a
    # nearly full disk takes only part of it.
    large = raw_image("disk-large", [16] * 80)
    fake.add_image(REPO, "cached", cached)
    fake.add_image(REPO, "large", large)
    assert read_whole(get(server, fake, "manifests/cached")) == cached.bytes
    wait_for_blobs(cache_root, cached)  # pulled in the background
    filler = fill_disk(cache_root, leave=free)

    response = get(server, fake, "manifests/large")

    assert response.status == 507
    message = json.loads(response.data)["errors"][0]["message"]
    assert message.startswith("no space left in the cache root")
    assert_nothing_partial(cache_root)
    assert read_whole(get(server, fake, "manifests/cached")) == cached.bytes
    filler.unlink()
    assert read_whole(get(server, fake, "manifests/large")) == large.bytes
    assert_nothing_partial(cache_root)
    assert "Traceback" not in server.read_log()

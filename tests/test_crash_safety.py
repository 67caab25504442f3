"""SIGKILL the server mid-pull, again and again: the cache root stays sound.

Every kill lands at a random moment of a pull from an upstream that trickles,
so most of them cut blob downloads (and now and then a manifest write) short.
After each kill the cache root must hold only verified content, including
everything a client had already received in full; after each restart the
dead process's temporary files are gone and its lock files block nobody.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import urllib3
from support.cache_checks import assert_cache_sound
from support.fake_upstream import Stall, Trickle
from support.images import Image, make_image, raw_image

KILLS = 15
SEED = 8
MIB = 1024 * 1024
MAX_KILL_DELAY = 0.8  # seconds: about as long as a trickled pull takes
TRICKLE = dict(chunk_size=64 * 1024, interval=0.01)  # about 6 MB/s a stream
REPO = "app/crash"


def cached_names(root: Path) -> set[str]:
    """Return the hex digests of every cached blob and manifest record."""
    return {
        path.name
        for folder in ("blobs", "img", "lts")
        for path in (root / folder).iterdir()
    }


def pull_image(server, fake, tag: str, image: Image) -> set[str]:
    """Pull a manifest and its blobs (blobs at once); return what came whole."""
    client = urllib3.PoolManager(retries=False, timeout=30)
    base = f"{server.url}/v2/{fake.host_port}/{REPO}"
    received = set()
    manifest = get_whole(client, f"{base}/manifests/{tag}")
    if manifest is None:
        return received
    received.add(hashlib.sha256(manifest).hexdigest())
    with ThreadPoolExecutor(len(image.blobs)) as pool:
        bodies = pool.map(
            lambda blob: get_whole(client, f"{base}/blobs/{blob.digest}"), image.blobs
        )
        received |= {hashlib.sha256(body).hexdigest() for body in bodies if body}
    return received


def get_whole(client: urllib3.PoolManager, url: str) -> bytes | None:
    """Return a 200 body that arrived in full, or None on any failure."""
    try:
        response = client.request("GET", url)
    except urllib3.exceptions.HTTPError:
        return None
    return response.data if response.status == 200 else None


def kill(server) -> None:
    """SIGKILL the server and reap it; it gets no chance to clean up."""
    os.kill(server.pid, signal.SIGKILL)
    server.stop()


@pytest.fixture
def crash_server(oci_server, fake_upstream):
    fake = fake_upstream()
    config = {"registries": [fake.registry_config()]}
    server = oci_server("--pull-timeout", "30000", config=config)
    return server, fake


def test_server_killed_mid_pull_restarts_with_only_verified_content(
    crash_server, cache_root
):
    server, fake = crash_server
    rng = random.Random(SEED)
    images = [
        raw_image(f"crash-{n}", [rng.randint(1, 4) * MIB for _ in range(3)])
        for n in range(KILLS)
    ]
    for n, image in enumerate(images):
        fake.add_image(REPO, str(n), image)
        for blob in image.layers:
            fake.add_fault(fake.blob_path(REPO, blob.digest), Trickle(**TRICKLE))
    cut_downloads = stale_temp_files = 0

    with ThreadPoolExecutor(2) as pool:
        for n in range(KILLS):
            # Each round resumes the image the last kill cut short, and
            # starts a new one.
            pulls = [
                pool.submit(pull_image, server, fake, str(m), images[m])
                for m in {max(n - 1, 0), n}
            ]
            time.sleep(rng.uniform(0.0, MAX_KILL_DELAY))  # the kill point
            kill(server)
            done, _ = wait(pulls, timeout=30)
            received = set().union(*(future.result() for future in done))
            leftovers = list((cache_root / ".tmp").iterdir())

            assert len(done) == len(pulls)
            assert_cache_sound(cache_root)
            assert received <= cached_names(cache_root), "served, then lost"
            cut_downloads += any(p.stat().st_size for p in leftovers)
            stale_temp_files += len(leftovers)
            server.start()
            assert list((cache_root / ".tmp").iterdir()) == []

    fake.clear_faults()
    for n, image in enumerate(images):
        received = pull_image(server, fake, str(n), image)
        assert received == {image.hex} | {blob.hex for blob in image.blobs}
    assert_cache_sound(cache_root)
    print(
        f"\ncrash safety: {KILLS} kills survived, {cut_downloads} cut a download "
        f"short, {stale_temp_files} stale temporary files removed at restart"
    )
    assert cut_downloads >= KILLS // 3


def lock_path(root: Path, key: str) -> Path:
    """Return the lock file the store uses for a piece of work."""
    return root / ".locks" / hashlib.sha256(key.encode()).hexdigest()[:40]


def is_locked(path: Path) -> bool:
    """Tell whether some process holds an flock on a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("kind", ["manifests", "blobs"])
def test_lock_of_a_killed_server_does_not_block_the_next_pull(
    crash_server, cache_root, kind
):
    server, fake = crash_server
    image = make_image("stale-lock", layer_sizes=(1 * MIB,))
    fake.add_image(REPO, "1", image)
    layer = image.layers[0]
    if kind == "manifests":
        path, key = fake.manifest_path(REPO, "1"), f"manifest:{fake.host_port}/{REPO}:1"
        stall, expected, reference = Stall(times=1), image.bytes, "1"
    else:
        path, key = fake.blob_path(REPO, layer.digest), f"blob:{layer.hex}"
        stall, expected = Stall(times=1, after_bytes=64 * 1024), layer.data
        reference = layer.digest
    fake.add_fault(path, stall)
    url = f"{server.url}/v2/{fake.host_port}/{REPO}/{kind}/{reference}"
    client = urllib3.PoolManager(retries=False, timeout=30)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(get_whole, client, url)
        assert stall.arrived.wait(10)
        lock = lock_path(cache_root, key)
        assert is_locked(lock)
        kill(server)
        pending.result(timeout=10)

    assert lock.exists() and not is_locked(lock)  # stale, as a crash leaves it
    server.start()
    started = time.monotonic()
    response = client.request("GET", url)
    elapsed = time.monotonic() - started
    stall.release.set()

    assert response.status == 200 and response.data == expected
    assert elapsed < 2.0, f"pull waited {elapsed:.1f}s behind a dead lock"

"""Upstream faults a real registry cannot make on purpose, via a fake upstream."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import urllib3
from support.fake_upstream import DropAfter, InvalidJson, Stall, Status, WrongBytes
from support.images import make_image, make_index
from support.processes import wait_until

LAYER = 256 * 1024


@pytest.fixture
def image():
    return make_image("faults", layer_sizes=(LAYER, 4096))


@pytest.fixture
def fake(fake_upstream, image):
    upstream = fake_upstream()
    upstream.add_image("app/x", "1", image)
    return upstream


def start(oci_server, *fakes, args=(), **config):
    registries = [f.registry_config() for f in fakes]
    return oci_server(*args, config={"registries": registries, **config})


def fetch(server, fake, path, retries=False, headers=None):
    client = urllib3.PoolManager(retries=retries, timeout=30)
    url = f"{server.url}/v2/{fake.host_port}/{path}"
    return client.request("GET", url, headers=headers, preload_content=False)


def read_all(response):
    """Read a body; return (bytes, whether a whole 200 body arrived).

    A failure before the first byte is an error status; after it, a body
    cut short of its Content-Length. Either way the client sees an error.
    """
    try:
        data = response.read()
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead):
        return b"", False
    expected = int(response.headers.get("Content-Length", len(data)))
    return data, response.status == 200 and len(data) == expected


def cached_blobs(cache_root):
    return set(os.listdir(cache_root / "blobs"))


def test_blob_dropped_midstream_is_not_cached(oci_server, fake, image, cache_root):
    layer = image.layers[0]
    fake.add_fault(
        fake.blob_path("app/x", layer.digest), DropAfter(n_bytes=1000, times=1)
    )
    server = start(oci_server, fake)

    first = read_all(fetch(server, fake, f"app/x/blobs/{layer.digest}"))
    second = read_all(fetch(server, fake, f"app/x/blobs/{layer.digest}"))

    assert first[1] is False
    assert second == (layer.data, True)
    assert cached_blobs(cache_root) == {layer.digest[7:]}


def test_wrong_bytes_for_a_digest_never_reach_cache_or_client_whole(
    oci_server, fake, image, cache_root
):
    layer = image.layers[0]
    fake.add_fault(fake.blob_path("app/x", layer.digest), WrongBytes())
    server = start(oci_server, fake)

    data, whole = read_all(fetch(server, fake, f"app/x/blobs/{layer.digest}"))

    assert not whole
    assert hashlib.sha256(data).hexdigest() != layer.digest[7:] or not data
    assert layer.digest[7:] not in cached_blobs(cache_root)
    assert os.listdir(cache_root / ".tmp") == []
    assert "digest mismatch" in server.wait_for_log("blob download failed")


def test_stalled_upstream_gives_504_and_releases_waiters(oci_server, fake):
    stall = fake.add_fault(fake.manifest_path("app/x", "1"), Stall())
    server = start(oci_server, fake, args=("--pull-timeout", "1000"))

    try:
        with ThreadPoolExecutor(5) as pool:
            statuses = list(
                pool.map(
                    lambda _: fetch(server, fake, "app/x/manifests/1").status, range(5)
                )
            )
    finally:
        stall.release.set()

    assert statuses == [504] * 5
    assert fake.count(fake.manifest_path("app/x", "1")) == 1


def test_stalled_blob_gives_504(oci_server, fake, image, cache_root):
    layer = image.layers[0]
    stall = fake.add_fault(fake.blob_path("app/x", layer.digest), Stall())
    server = start(oci_server, fake, args=("--pull-timeout", "1000"))

    try:
        response = fetch(server, fake, f"app/x/blobs/{layer.digest}")
    finally:
        stall.release.set()

    assert response.status == 504
    assert json.loads(response.data)["errors"][0]["message"].startswith(
        f"upstream {fake.host_port}"
    )
    assert layer.digest[7:] not in cached_blobs(cache_root)


@pytest.mark.parametrize(
    ("fault", "status"),
    [(Status(status=503), 502), (Status(status=429), 502), (InvalidJson(), 502)],
)
def test_bad_manifest_answers_are_502_and_not_cached(
    oci_server, fake, cache_root, fault, status
):
    fake.add_fault(fake.manifest_path("app/x", "1"), fault)
    server = start(oci_server, fake)

    response = fetch(server, fake, "app/x/manifests/1")

    assert response.status == status
    assert fake.host_port in json.loads(response.data)["errors"][0]["message"]
    assert os.listdir(cache_root / "img") == []


def test_refused_upstream_is_502_naming_it(oci_server, fake):
    server = start(oci_server, fake)
    fake.close()

    response = fetch(server, fake, "app/x/manifests/1")

    assert response.status == 502
    assert fake.host_port in json.loads(response.data)["errors"][0]["message"]


def test_concurrent_pulls_of_one_image_reach_upstream_once_each(
    oci_server, fake_upstream
):
    fake = fake_upstream()
    index = make_index("single-flight", layer_sizes=(LAYER, LAYER, 4096))
    fake.add_index("app/y", "1", index)
    gate = fake.gate()
    server = start(oci_server, fake)
    image = index.image_for("linux", "amd64")
    sent = threading.Barrier(21, timeout=20)

    def pull(_):
        client = urllib3.PoolManager(retries=False, timeout=30)
        base = f"{server.url}/v2/{fake.host_port}/app/y"
        first = client.request("GET", f"{base}/manifests/1", preload_content=False)
        sent.wait()
        bodies = [first.read()]
        for path in [f"manifests/{image.digest}"] + [
            f"blobs/{b.digest}" for b in [image.config, *image.layers]
        ]:
            bodies.append(client.request("GET", f"{base}/{path}").data)
        return bodies

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(pull, n) for n in range(20)]
        gate.wait_arrived(1)
        gate.release()
        sent.wait()
        results = [f.result(timeout=60) for f in futures]

    expected = [index.bytes, image.bytes] + [
        b.data for b in [image.config, *image.layers]
    ]
    assert all(bodies == expected for bodies in results)
    hits = fake.hits()
    assert hits[("GET", "/v2/app/y/manifests/1")] == 1
    assert hits[("GET", f"/v2/app/y/manifests/{image.digest}")] == 1
    for blob in [image.config, *image.layers]:
        assert hits[("GET", f"/v2/app/y/blobs/{blob.digest}")] == 1


def test_token_exchange_with_credentials(oci_server, fake_upstream, image):
    fake = fake_upstream(auth="bearer", credentials=("puller", "s3cret"))
    fake.add_image("app/x", "1", image)
    server = start(oci_server, fake)

    manifest = fetch(server, fake, "app/x/manifests/1")
    blob = fetch(server, fake, f"app/x/blobs/{image.layers[1].digest}")

    assert manifest.status == 200 and manifest.data == image.bytes
    assert blob.status == 200 and blob.data == image.layers[1].data
    token_requests = fake.requests("/token")
    assert token_requests and all(
        r.headers.get("authorization", "").startswith("Basic ") for r in token_requests
    )
    content = [r for r in fake.requests() if r.path.startswith("/v2/app/")]
    assert any(
        r.headers.get("authorization", "").startswith("Bearer ") for r in content
    )
    assert "s3cret" not in server.read_log()


def test_credentials_are_not_forwarded_across_a_redirect(
    oci_server, fake_upstream, image
):
    storage = fake_upstream(address="127.0.0.4")
    storage.add_image("app/x", "1", image)
    fake = fake_upstream(auth="basic", credentials=("puller", "s3cret"))
    fake.add_image("app/x", "1", image)
    fake.redirect_blobs_to(storage)
    server = start(oci_server, fake)
    layer = image.layers[1]

    response = fetch(server, fake, f"app/x/blobs/{layer.digest}")

    assert response.status == 200 and response.data == layer.data
    assert storage.count(storage.blob_path("app/x", layer.digest)) == 1
    assert storage.authorization_headers() == []
    assert fake.authorization_headers()


def test_blob_waits_for_stale_lock_free_after_holder_died(
    oci_server, fake, image, cache_root
):
    layer = image.layers[0]
    server = start(oci_server, fake)

    response = fetch(server, fake, f"app/x/blobs/{layer.digest}")

    assert response.status == 200
    wait_until(lambda: layer.digest[7:] in cached_blobs(cache_root), 10, "blob cached")


def test_blob_failing_after_first_bytes_cuts_the_client_short(
    oci_server, fake, image, cache_root
):
    layer = image.layers[0]
    stall = fake.add_fault(
        fake.blob_path("app/x", layer.digest),
        Stall(after_bytes=100_000, then_drop=True, times=1),
    )
    server = start(oci_server, fake)
    response = fetch(server, fake, f"app/x/blobs/{layer.digest}")
    first = response.read(50_000)

    stall.release.set()
    data, whole = read_all(response)

    assert response.status == 200 and first == layer.data[:50_000]
    assert not whole
    assert layer.digest[7:] not in cached_blobs(cache_root)
    assert os.listdir(cache_root / ".tmp") == []

"""End to end: our server in front of a real docker-registry upstream."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from support.images import Image, ImageIndex
from support.processes import wait_until

from ociregistry.manifest import OCI_INDEX


@pytest.fixture
def oci_server(oci_server, registry_upstream):
    """Our server, configured to reach the session upstream over http."""

    def start(*args, config=None, upstreams=(), **options):
        entries = [u.registry_config() for u in (registry_upstream, *upstreams)]
        config = {"registries": entries, **(config or {})}
        return oci_server(*args, config=config, **options)

    return start


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def get(server, path, method="GET", headers=None):
    return server.client().request(method, server.url + path, headers=headers)


def raw_get(server, path):
    """GET a path exactly as written (urllib3 would remove dot segments)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_quick_start_curl_sequence(registry_upstream, oci_server, cache_root):
    server = oci_server()
    index: ImageIndex = registry_upstream.content["multi/arch:1.0"]
    ns = registry_upstream.namespace

    listing = get(server, f"/v2/multi/arch/manifests/1.0?ns={ns}")
    image = index.images[0]
    manifest = get(server, f"/v2/multi/arch/manifests/{image.digest}?ns={ns}")

    assert listing.status == 200
    assert listing.data == index.bytes
    assert listing.headers["Content-Type"] == OCI_INDEX
    assert listing.headers["Docker-Content-Digest"] == index.digest
    assert listing.headers["OCI-Namespace"] == ns
    assert listing.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert manifest.status == 200
    assert manifest.data == image.bytes
    img = {p.name for p in (cache_root / "img").iterdir()}
    assert {index.digest[7:], image.digest[7:]} <= img
    blobs = {b.digest[7:] for b in [image.config, *image.layers]}
    wait_until(
        lambda: blobs <= set(os.listdir(cache_root / "blobs")), 10, "blobs cached"
    )


def test_cache_hits_are_logged_like_the_quick_start(registry_upstream, oci_server):
    server = oci_server()
    ns = registry_upstream.namespace
    get(server, f"/v2/multi/arch/manifests/1.0?ns={ns}")

    get(server, f"/v2/multi/arch/manifests/1.0?ns={ns}")

    log = server.wait_for_log(f'serving manifest from cache: "{ns}/multi/arch:1.0"')
    assert f"GET:/v2/multi/arch/manifests/1.0?ns={ns} status=200 latency=" in log


@pytest.mark.parametrize(
    "name", ["multi/arch:1.0", "docker/list:2.0", "single/docker:1", "a/b/c/d/e:1"]
)
def test_skopeo_copies_through_the_in_path_form(
    registry_upstream, oci_server, tmp_path, name
):
    server = oci_server()
    source = (
        f"docker://{server.host}:{server.port}/{registry_upstream.namespace}/{name}"
    )
    target = tmp_path / "oci"

    skopeo_copy(source, f"oci:{target}")

    assert_layout_verified(target)
    item = registry_upstream.content[name]
    expected = item.images[0] if isinstance(item, ImageIndex) else item
    # skopeo rewrites a Docker config when it writes an OCI layout, so only
    # the layers are compared.
    layers = {b.digest[7:] for b in expected.layers}
    assert layers <= set(os.listdir(target / "blobs" / "sha256"))


def test_cached_content_is_served_after_restart_without_upstream(
    registry_upstream_factory, oci_server, tmp_path
):
    upstream = registry_upstream_factory({"gone/soon:1": _image("gone-soon")})
    server = oci_server(upstreams=[upstream])
    source = f"docker://{server.host}:{server.port}/{upstream.namespace}/gone/soon:1"
    skopeo_copy(source, f"oci:{tmp_path / 'first'}")
    upstream.stop()

    server.restart()
    skopeo_copy(source, f"oci:{tmp_path / 'second'}")

    assert_layout_verified(tmp_path / "second")
    assert "pulling" not in server.read_log().split("server is running")[-1]


def test_tags_are_case_sensitive(registry_upstream, oci_server):
    server = oci_server()
    ns = registry_upstream.namespace

    exact = get(server, f"/v2/{ns}/single/oci/manifests/CaseTag")
    lower = get(server, f"/v2/{ns}/single/oci/manifests/casetag")

    assert exact.status == 200
    assert exact.data == registry_upstream.content["single/oci:CaseTag"].bytes
    assert lower.status == 404
    assert json.loads(lower.data)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_blob_ranges_are_answered_with_206(registry_upstream, oci_server):
    server = oci_server()
    image: Image = registry_upstream.content["single/oci:1"]
    layer = image.layers[-1]
    path = f"/v2/{registry_upstream.namespace}/single/oci/blobs/{layer.digest}"

    cold = get(server, path, headers={"Range": "bytes=10-19"})
    warm = get(server, path, headers={"Range": "bytes=-5"})
    whole = get(server, path)
    outside = get(server, path, headers={"Range": f"bytes={len(layer.data)}-"})

    assert cold.status == 206
    assert cold.data == layer.data[10:20]
    assert cold.headers["Content-Range"] == f"bytes 10-19/{len(layer.data)}"
    assert warm.status == 206 and warm.data == layer.data[-5:]
    assert whole.status == 200 and sha256(whole.data) == layer.digest
    assert whole.headers["Content-Length"] == str(len(layer.data))
    assert outside.status == 416
    assert outside.headers["Content-Range"] == f"bytes */{len(layer.data)}"
    assert json.loads(outside.data)["errors"][0]["code"] == "RANGE_INVALID"


def test_head_answers_like_get_without_a_body(registry_upstream, oci_server):
    server = oci_server()
    image: Image = registry_upstream.content["single/oci:1"]
    base = f"/v2/{registry_upstream.namespace}/single/oci"

    manifest = get(server, f"{base}/manifests/1", method="HEAD")
    blob = get(server, f"{base}/blobs/{image.config.digest}", method="HEAD")

    assert manifest.status == 200 and manifest.data == b""
    assert manifest.headers["Docker-Content-Digest"] == image.digest
    assert manifest.headers["Content-Length"] == str(len(image.bytes))
    assert blob.status == 200 and blob.data == b""
    assert blob.headers["Content-Length"] == str(len(image.config.data))


def test_air_gapped_serves_cache_only(registry_upstream, oci_server):
    ns = registry_upstream.namespace
    warm = oci_server()
    assert get(warm, f"/v2/{ns}/single/docker/manifests/1").status == 200
    warm.stop()

    server = oci_server("--air-gapped")
    cached = get(server, f"/v2/{ns}/single/docker/manifests/1")
    missing = get(server, f"/v2/{ns}/single/oci/manifests/1")

    assert cached.status == 200
    assert missing.status == 404
    assert json.loads(missing.data)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    before = registry_upstream.count_requests("/v2/single/oci/manifests/1")
    assert registry_upstream.count_requests("/v2/single/oci/manifests/1") == before


def test_always_pull_latest_refetches_latest_only(registry_upstream, oci_server):
    server = oci_server("--always-pull-latest")
    ns = registry_upstream.namespace
    latest = "/v2/single/oci/manifests/latest"
    tagged = "/v2/single/oci/manifests/1"
    before = (
        registry_upstream.count_requests(latest),
        registry_upstream.count_requests(tagged),
    )

    for _ in range(3):
        assert get(server, f"/v2/{ns}/single/oci/manifests/latest").status == 200
        assert get(server, f"/v2/{ns}/single/oci/manifests/1").status == 200

    assert registry_upstream.count_requests(latest) - before[0] == 3
    assert registry_upstream.count_requests(tagged) - before[1] <= 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/{ns}/x/blobs/uploads/"),
        ("PATCH", "/v2/{ns}/x/blobs/uploads/abc"),
        ("PUT", "/v2/{ns}/x/manifests/1"),
        ("DELETE", "/v2/{ns}/x/manifests/1"),
        ("DELETE", "/v2/{ns}/x/blobs/sha256:" + "a" * 64),
        ("GET", "/v2/{ns}/x/blobs/uploads/abc"),
    ],
)
def test_writes_are_unsupported(registry_upstream, oci_server, method, path):
    server = oci_server()

    response = get(server, path.format(ns=registry_upstream.namespace), method=method)

    assert response.status == 405
    assert json.loads(response.data)["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/{ns}/../../etc/manifests/1", 400, "NAME_INVALID"),
        ("/v2/{ns}/%2e%2e/%2e%2e/etc/manifests/1", 400, "NAME_INVALID"),
        ("/v2/{ns}//etc/passwd/manifests/1", 400, "NAME_INVALID"),
        ("/v2/{ns}/x/blobs/sha256:../../../etc/passwd", 400, "NAME_INVALID"),
        ("/v2/{ns}/x/blobs/sha256:%2e%2e%2f%2e%2e", 400, "NAME_INVALID"),
        ("/v2/{ns}/x/blobs/sha256:%2fetc%2fpasswd", 404, "NAME_UNKNOWN"),
        ("/v2/{ns}/x/blobs/sha512:" + "a" * 128, 400, "DIGEST_INVALID"),
        ("/v2/{ns}/x/blobs/md5:abc", 400, "DIGEST_INVALID"),
        ("/v2/{ns}/x/manifests/sha256:" + "a" * 63, 400, "DIGEST_INVALID"),
        ("/v2/{ns}/x/manifests/..", 400, "NAME_INVALID"),
        ("/v2/{ns}/x/manifests/.bad", 400, "TAG_INVALID"),
        ("/v2/{ns}/" + "a" * 300 + "/manifests/1", 400, "NAME_INVALID"),
        ("/v2/x/manifests/1", 400, "NAME_INVALID"),
        ("/v2/{ns}/x/nothing/here", 404, "NAME_UNKNOWN"),
        ("/nothing", 404, "NAME_UNKNOWN"),
    ],
)
def test_bad_input_gets_the_right_oci_error(
    registry_upstream, oci_server, cache_root, tmp_path, path, status, code
):
    server = oci_server()
    before = sorted(str(p) for p in tmp_path.rglob("*") if "servers" not in p.parts)

    status_seen, body = raw_get(server, path.format(ns=registry_upstream.namespace))

    assert status_seen == status
    assert json.loads(body)["errors"][0]["code"] == code
    after = sorted(str(p) for p in tmp_path.rglob("*") if "servers" not in p.parts)
    assert after == before


def _image(seed: str) -> Image:
    from support.images import make_image

    return make_image(seed)


def skopeo_copy(source: str, target: str) -> None:
    done = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", source, target],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def assert_layout_verified(layout: Path) -> None:
    """Check every blob of an OCI layout against its digest."""
    blobs = list((layout / "blobs" / "sha256").iterdir())
    assert blobs
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_podman_pulls_through_the_in_path_form(registry_upstream, oci_server, tmp_path):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    server = oci_server()
    index: ImageIndex = registry_upstream.content["docker/list:2.0"]
    image = index.image_for("linux", "amd64")
    reference = (
        f"{server.host}:{server.port}/{registry_upstream.namespace}/docker/list:2.0"
    )
    # podman refuses a runroot path longer than 50 characters.
    with tempfile.TemporaryDirectory(prefix="podman-") as runroot:
        podman = ["podman", "--root", str(tmp_path / "root"), "--runroot", runroot]
        pulled = subprocess.run(
            [
                *podman,
                "--storage-driver",
                "vfs",
                "pull",
                "--tls-verify=false",
                "--arch",
                "amd64",
                reference,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().splitlines()[-1] == image.config.digest[7:]

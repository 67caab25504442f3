"""The --hello-world test mode: a built-in image, served with no upstream."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from support.processes import wait_until

from ociregistry.helloworld import GREETING, build_hello_world, build_layer

SKOPEO_MISSING = "skopeo is not installed"


def skopeo_copy(source: str, target: Path, *options: str) -> None:
    """Copy an image with skopeo for linux/amd64, from plain http."""
    if shutil.which("skopeo") is None:
        pytest.skip(SKOPEO_MISSING)
    done = subprocess.run(
        ["skopeo", "--override-os", "linux", "--override-arch", "amd64", "copy"]
        + ["--src-tls-verify=false", *options, source, f"oci:{target}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def layout_digests(layout: Path) -> list[str]:
    """Return the manifest digests an OCI layout's index.json lists."""
    index = json.loads((layout / "index.json").read_text())
    return [entry["digest"] for entry in index["manifests"]]


def assert_layout_verified(layout: Path) -> None:
    """Check every blob of an OCI layout against its digest."""
    blobs = list((layout / "blobs" / "sha256").iterdir())
    assert blobs
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_skopeo_copies_hello_world_from_hello_world_mode(oci_server, tmp_path):
    server = oci_server("--hello-world")
    hello = build_hello_world()
    target = tmp_path / "layout"

    skopeo_copy(f"docker://{server.address}/docker.io/hello-world:latest", target)

    assert layout_digests(target) == [hello.image_digest]
    assert_layout_verified(target)
    blob_names = {p.name for p in (target / "blobs" / "sha256").iterdir()}
    assert set(hello.blobs) <= blob_names


def test_skopeo_copies_the_whole_index_with_all(oci_server, tmp_path):
    server = oci_server("--hello-world")
    target = tmp_path / "layout"

    skopeo_copy(
        f"docker://{server.address}/docker.io/hello-world:latest", target, "--all"
    )

    assert layout_digests(target) == [build_hello_world().index_digest]
    assert_layout_verified(target)


def test_hello_world_answers_without_a_namespace(oci_server, tmp_path):
    server = oci_server("--hello-world")
    target = tmp_path / "layout"

    skopeo_copy(f"docker://{server.address}/hello-world:latest", target)

    assert layout_digests(target) == [build_hello_world().image_digest]


def test_hello_world_mode_serves_nothing_else_and_calls_no_upstream(
    oci_server, fake_upstream, cache_root
):
    fake = fake_upstream()
    server = oci_server("--hello-world")
    path = f"/v2/{fake.host_port}/some/image/manifests/1"

    response = server.client().request("GET", server.url + path)

    assert response.status == 404
    assert json.loads(response.data)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake.requests() == []
    assert list(cache_root.iterdir()) == []


def test_hello_world_cache_root_is_removed_at_exit(oci_server):
    server = oci_server("--hello-world")
    log = server.wait_for_log("serving the built-in image from")
    root = Path(re.search(r'built-in image from "([^"]+)"', log).group(1))
    assert (root / "blobs").is_dir()

    code = server.stop()

    assert code == 0
    wait_until(lambda: not root.exists(), 5, "temporary cache root removed")


def test_hello_world_image_is_built_the_same_every_time():
    first, second = build_hello_world(), build_hello_world()

    tar_bytes, layer = build_layer()

    assert first == second
    assert layer in first.blobs.values()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.getmember("hello")
        assert tar.extractfile(member).read() == GREETING
    config = json.loads(first.blobs[json.loads(first.image)["config"]["digest"][7:]])
    assert config["rootfs"]["diff_ids"] == [
        "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    ]
    assert json.loads(first.index)["manifests"][0]["platform"] == {
        "architecture": "amd64",
        "os": "linux",
    }

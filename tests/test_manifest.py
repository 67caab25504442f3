"""Unit tests of manifest records: the Go server's format, both ways."""

from __future__ import annotations

import base64
import json

import pytest

from ociregistry.errors import ManifestInvalid
from ociregistry.manifest import (
    DOCKER_LIST,
    OCI_IMAGE,
    Descriptor,
    Manifest,
    media_type_of,
    pick_platform,
    sha256_digest,
)

INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [
            {
                "digest": "sha256:" + "1" * 64,
                "size": 10,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {
                "digest": "sha256:" + "2" * 64,
                "size": 10,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
).encode()


def go_record(data: bytes, url: str, code: int, key: str) -> bytes:
    """Write a record the way the Go server does (no keys of ours)."""
    return json.dumps(
        {
            "type": code,
            "digest": sha256_digest(data)[7:],
            "imageUrl": url,
            "bytes": base64.b64encode(data).decode(),
            key: json.loads(data),
            "created": "2025-09-10T19:30:24",
            "pulled": "2025-09-10T19:31:00",
        }
    ).encode()


def test_record_written_by_the_go_server_is_read():
    raw = go_record(
        INDEX, "registry.k8s.io/kube-scheduler:v1.29.1", 0, "v2.docker.manifestList"
    )

    manifest = Manifest.from_record(raw)

    assert manifest.media_type == DOCKER_LIST
    assert manifest.data == INDEX
    assert manifest.image_urls == ["registry.k8s.io/kube-scheduler:v1.29.1"]
    assert manifest.is_index
    assert manifest.created == "2025-09-10T19:30:24"


def test_our_record_carries_every_key_the_go_server_reads():
    manifest = Manifest(
        sha256_digest(INDEX), DOCKER_LIST, INDEX, ["r.io/x:1", "r.io/x:2"]
    )

    record = json.loads(manifest.to_record())

    assert record["type"] == 0
    assert record["digest"] == manifest.hex
    assert record["imageUrl"] == "r.io/x:1"
    assert base64.b64decode(record["bytes"]) == INDEX
    assert record["v2.docker.manifestList"]["manifests"][0]["size"] == 10
    assert Manifest.from_record(manifest.to_record()).image_urls == [
        "r.io/x:1",
        "r.io/x:2",
    ]


def test_record_whose_bytes_do_not_match_its_digest_is_refused():
    raw = json.loads(go_record(INDEX, "r.io/x:1", 0, "v2.docker.manifestList"))
    raw["digest"] = "0" * 64

    with pytest.raises(ManifestInvalid):
        Manifest.from_record(json.dumps(raw).encode())


def test_artifact_media_types_are_kept_as_type_four():
    data = b'{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart.v1+json"}'
    manifest = Manifest(
        sha256_digest(data), media_type_of(data, ""), data, ["r.io/c:1"]
    )

    record = json.loads(manifest.to_record())

    assert record["type"] == 4
    assert Manifest.from_record(manifest.to_record()).media_type == manifest.media_type


def test_media_type_falls_back_to_the_content_type_header():
    assert media_type_of(b'{"schemaVersion":2,"config":{}}', OCI_IMAGE) == OCI_IMAGE
    with pytest.raises(ManifestInvalid):
        media_type_of(b"not json", OCI_IMAGE)


def test_platform_is_picked_with_and_without_variant():
    children = Manifest(sha256_digest(INDEX), DOCKER_LIST, INDEX, ["x"]).children()

    assert pick_platform(children, "linux", "amd64").digest.endswith("2" * 64)
    assert pick_platform(children, "linux", "arm64/v8").digest.endswith("1" * 64)
    assert pick_platform(children, "windows", "amd64") is None
    assert isinstance(children[0], Descriptor)

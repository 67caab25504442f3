"""A cache root filled by pulling through our server from a real upstream.

The administration tests (list, prune, /cmd, the background pruner) each
need a cache root with known content. `filled_cache` pulls it once per
session through our server from a docker-registry of its own; a test takes a
private copy with `cache_copy`, so it may prune or age it at will.
Load this module with `pytest_plugins = ["support.cache_fill"]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3

from support.images import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Blob,
    Image,
    ImageIndex,
    make_config,
    make_image,
    make_index,
    make_layer,
    serialise,
    sha256_digest,
)
from support.processes import OciServer, wait_until
from support.push import push_content
from support.upstream import RegistryUpstream, registry_binary

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
PLATFORM = ("linux", "amd64")
FILL_TIMEOUT = 30.0


def image_with_layers(seed: str, layers: list[tuple[Blob, str]]) -> Image:
    """Build a linux/amd64 OCI image from given (layer, diff id) pairs."""
    config = make_config(seed, [diff for _, diff in layers], PLATFORM, OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer, _ in layers],
    }
    data = serialise(manifest)
    return Image(
        data, sha256_digest(data), OCI_MANIFEST, config, [b for b, _ in layers]
    )


def admin_content() -> dict[str, Image | ImageIndex]:
    """Return the images of the cache: two share a base layer, one is an index."""
    base = make_layer("admin-base", 3000)
    return {
        "app/one:1": image_with_layers("app-one", [base, make_layer("one", 1500)]),
        "app/two:1": image_with_layers("app-two", [base, make_layer("two", 2500)]),
        "multi/arch:1.0": make_index("admin-multi"),
        "other/img:latest": make_image("admin-other", layer_sizes=(700,)),
        "big/layer:1": make_image("admin-big", layer_sizes=(8 << 20,)),
    }


@dataclass
class FilledCache:
    """A cache root pulled through our server, and the upstream it came from."""

    root: Path
    upstream: RegistryUpstream
    content: dict[str, Image | ImageIndex]

    @property
    def namespace(self) -> str:
        """Return the upstream as image URLs name it (`127.0.0.N`)."""
        return self.upstream.namespace

    def url(self, name: str) -> str:
        """Return the image URL a `repo:tag` is cached as."""
        return f"{self.namespace}/{name}"

    def image(self, name: str) -> Image:
        """Return the linux/amd64 image of a `repo:tag`."""
        item = self.content[name]
        return item.image_for(*PLATFORM) if isinstance(item, ImageIndex) else item

    def config(self, **extra: Any) -> dict[str, Any]:
        """Return a server config that reaches the upstream."""
        return {"registries": [self.upstream.registry_config()], **extra}

    def pull(self, server: OciServer, name: str) -> list[Blob]:
        """Pull a `repo:tag` through a server, verifying every blob."""
        return pull(server.client(), server.url, self.namespace, name)

    def record_files(self, digest: str) -> list[Path]:
        """Return the record files of a manifest digest (in img/ and lts/)."""
        hex_digest = digest.removeprefix("sha256:")
        paths = [self.root / folder / hex_digest for folder in ("img", "lts")]
        return [path for path in paths if path.exists()]

    def record(self, digest: str) -> dict[str, Any]:
        """Return the first record of a manifest digest, parsed."""
        parsed: dict[str, Any] = json.loads(self.record_files(digest)[0].read_bytes())
        return parsed

    def set_stamps(self, digest: str, **stamps: str) -> None:
        """Rewrite `created` and/or `pulled` of a manifest's records on disk."""
        for path in self.record_files(digest):
            record = json.loads(path.read_bytes())
            record.update(stamps)
            path.write_text(json.dumps(record))

    def blob_names(self) -> set[str]:
        """Return the digests of the blobs in the cache root."""
        return {f"sha256:{name}" for name in os.listdir(self.root / "blobs")}

    def manifest_digests(self) -> set[str]:
        """Return the digests of every manifest record in the cache root."""
        return {
            f"sha256:{name}"
            for folder in ("img", "lts")
            if (self.root / folder).is_dir()
            for name in os.listdir(self.root / folder)
        }

    def tree_state(self) -> dict[str, tuple[int, int, str]]:
        """Return every path under the root with size, mtime and content hash."""
        state = {}
        for directory, folders, files in os.walk(self.root):
            for name in folders + files:
                path = Path(directory, name)
                stat = path.stat()
                content = path.read_bytes() if path.is_file() else b""
                state[str(path.relative_to(self.root))] = (
                    stat.st_size,
                    stat.st_mtime_ns,
                    hashlib.sha256(content).hexdigest(),
                )
        return state


def pull(
    pool: urllib3.PoolManager, base_url: str, namespace: str, name: str
) -> list[Blob]:
    """Pull an image (its linux/amd64 image from an index) and verify its blobs."""
    repo, _, tag = name.rpartition(":")
    prefix = f"{base_url}/v2/{namespace}/{repo}"
    response = pool.request(
        "GET", f"{prefix}/manifests/{tag}", headers={"Accept": ACCEPT}
    )
    assert response.status == 200, (name, response.status, response.data[:300])
    manifest = json.loads(response.data)
    if "manifests" in manifest:
        entry = next(
            m for m in manifest["manifests"] if m["platform"]["architecture"] == "amd64"
        )
        response = pool.request(
            "GET", f"{prefix}/manifests/{entry['digest']}", headers={"Accept": ACCEPT}
        )
        assert response.status == 200, (name, response.status)
        manifest = json.loads(response.data)
    blobs = []
    for descriptor in [manifest["config"], *manifest["layers"]]:
        body = pool.request("GET", f"{prefix}/blobs/{descriptor['digest']}").data
        assert sha256_digest(body) == descriptor["digest"]
        blobs.append(Blob(descriptor["digest"], body, descriptor["mediaType"]))
    return blobs


def fill_cache(filled: FilledCache, workdir: Path) -> None:
    """Pull every image of the content through a server on the cache root."""
    server = OciServer(
        filled.root,
        workdir,
        args=["--os", PLATFORM[0], "--arch", PLATFORM[1]],
        config=filled.config(),
    )
    with server:
        pool = server.client()
        wanted = set()
        for name in filled.content:
            wanted |= {
                b.digest[7:] for b in pull(pool, server.url, filled.namespace, name)
            }
        wait_until(
            lambda: wanted <= set(os.listdir(filled.root / "blobs")),
            FILL_TIMEOUT,
            "pulled blobs in the cache root",
        )


@pytest.fixture(scope="session")
def filled_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilledCache]:
    """A cache root holding `admin_content()`, pulled through our server.

    Tests must not change it: take a copy with `cache_copy`.
    """
    if registry_binary() is None:
        pytest.skip("docker-registry is not installed")
    workdir = tmp_path_factory.mktemp("filled")
    port = None if os.geteuid() == 0 else 0
    upstream = RegistryUpstream(workdir / "upstream", port=port).start()
    try:
        content = admin_content()
        push_content(upstream.url, content)
        upstream.content = dict(content)
        root = workdir / "cache"
        root.mkdir()
        filled = FilledCache(root, upstream, content)
        fill_cache(filled, workdir / "servers")
        yield filled
    finally:
        upstream.stop()


@pytest.fixture
def cache_copy(filled_cache: FilledCache, tmp_path: Path) -> FilledCache:
    """A private copy of the filled cache root, for one test to change."""
    root = tmp_path / "cache-copy"
    shutil.copytree(filled_cache.root, root, ignore=shutil.ignore_patterns(".locks"))
    return FilledCache(root, filled_cache.upstream, filled_cache.content)

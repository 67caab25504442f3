"""The `--hello-world` test mode: one tiny image, built here, served air-gapped.

The image is `docker.io/hello-world:latest`: an OCI index with one
linux/amd64 image whose single layer holds the file `/hello`. Every byte is
built in code the same way on every run, so its digests are stable. It is
written into a temporary cache root that the server removes at exit.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

from ociregistry.config import PruneSettings, Settings
from ociregistry.manifest import OCI_IMAGE, OCI_INDEX, Manifest, sha256_digest
from ociregistry.store import Store

log = logging.getLogger(__name__)

REPOSITORY = "docker.io/library/hello-world"
TAG = "latest"
GREETING = b"Hello from ociregistry!\nThis image was built into the server.\n"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
EPOCH = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class HelloWorld:
    """The bytes of the built-in image: blobs, image manifest and index."""

    blobs: dict[str, bytes]  # hex -> bytes
    image: bytes
    index: bytes

    @property
    def image_digest(self) -> str:
        """Return the digest of the linux/amd64 image manifest."""
        return sha256_digest(self.image)

    @property
    def index_digest(self) -> str:
        """Return the digest of the index the tag points at."""
        return sha256_digest(self.index)


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}


def build_layer() -> tuple[bytes, bytes]:
    """Return the layer's tar and its gzip, both byte-for-byte reproducible."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("hello")
        info.size, info.mode, info.mtime = len(GREETING), 0o755, 0
        tar.addfile(info, io.BytesIO(GREETING))
    tar_bytes = buffer.getvalue()
    return tar_bytes, gzip.compress(tar_bytes, compresslevel=9, mtime=0)


def build_hello_world() -> HelloWorld:
    """Build the image: layer, config, image manifest and a one-entry index."""
    tar_bytes, layer = build_layer()
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": EPOCH,
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar_bytes)]},
            "history": [{"created": EPOCH, "created_by": "ociregistry --hello-world"}],
        }
    )
    image = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE,
            "config": _descriptor(CONFIG_TYPE, config),
            "layers": [_descriptor(LAYER_TYPE, layer)],
        }
    )
    platform = {"architecture": "amd64", "os": "linux"}
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{**_descriptor(OCI_IMAGE, image), "platform": platform}],
        }
    )
    blobs = {sha256_digest(data)[7:]: data for data in (config, layer)}
    return HelloWorld(blobs, image, index)


def seed_cache(root: str) -> HelloWorld:
    """Write the built-in image into a cache root, blobs first."""
    hello = build_hello_world()
    store = Store(root)
    for hex_digest, data in hello.blobs.items():
        writer = store.new_blob_writer(hex_digest)
        writer.write(data)
        writer.commit(len(data))
    image_url = f"{REPOSITORY}@{hello.image_digest}"
    store.put_manifest(
        Manifest(hello.image_digest, OCI_IMAGE, hello.image, [image_url]), image_url
    )
    index_url = f"{REPOSITORY}:{TAG}"
    store.put_manifest(
        Manifest(hello.index_digest, OCI_INDEX, hello.index, [index_url]), index_url
    )
    return hello


def hello_world_settings(settings: Settings) -> tuple[Settings, str]:
    """Seed a temporary cache root; return the settings that serve only it."""
    root = tempfile.mkdtemp(prefix="ociregistry-hello-world-")
    try:
        seed_cache(root)
    except BaseException:
        remove_cache_root(root)
        raise
    log.info('serving the built-in image from "%s"', root)
    serving = dataclasses.replace(
        settings,
        image_path=root,
        air_gapped=True,
        preload_images="",
        default_ns=settings.default_ns or "docker.io",
        prune=PruneSettings(),
    )
    return serving, root


def remove_cache_root(root: str) -> None:
    """Remove a temporary cache root and everything in it."""
    shutil.rmtree(root, ignore_errors=True)

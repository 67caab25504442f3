"""Build deterministic test images, indexes and artifacts in memory."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

Platform = tuple[str, str] | tuple[str, str, str]


def sha256_digest(data: bytes) -> str:
    """Return the `sha256:<hex>` digest of some bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def serialise(document: dict[str, Any]) -> bytes:
    """Serialise a manifest the way registries often do: indented, not compact.

    The indentation makes any server that re-encodes a manifest, instead of
    keeping the upstream bytes, fail a byte comparison.
    """
    return json.dumps(document, indent=3).encode()


@dataclass(frozen=True)
class Blob:
    """A config or layer blob: its bytes, digest and media type."""

    digest: str
    data: bytes
    media_type: str

    @classmethod
    def of(cls, data: bytes, media_type: str) -> Blob:
        """Make a blob from bytes, computing its digest."""
        return cls(sha256_digest(data), data, media_type)

    @property
    def size(self) -> int:
        """Return the length of the blob in bytes."""
        return len(self.data)

    @property
    def hex(self) -> str:
        """Return the digest without its `sha256:` prefix."""
        return self.digest.split(":", 1)[1]

    def descriptor(self) -> dict[str, Any]:
        """Return the OCI descriptor of this blob."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """An image (or artifact) manifest with the blobs it references."""

    manifest_bytes: bytes
    manifest_digest: str
    media_type: str
    config: Blob
    layers: list[Blob]
    platform: Platform = ("linux", "amd64")
    artifact_type: str | None = None
    subject: dict[str, Any] | None = None

    @property
    def digest(self) -> str:
        """Return the manifest digest, named as `ImageIndex` names it."""
        return self.manifest_digest

    @property
    def bytes(self) -> builtins.bytes:
        """Return the manifest bytes, named as `ImageIndex` names them."""
        return self.manifest_bytes

    @property
    def blobs(self) -> list[Blob]:
        """Return the config followed by the layers."""
        return [self.config, *self.layers]

    @property
    def size(self) -> int:
        """Return the length of the manifest in bytes."""
        return len(self.manifest_bytes)

    @property
    def hex(self) -> str:
        """Return the manifest digest without its `sha256:` prefix."""
        return self.manifest_digest.split(":", 1)[1]

    def descriptor(self) -> dict[str, Any]:
        """Return the descriptor of this manifest, as an index lists it."""
        descriptor: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.manifest_digest,
            "size": self.size,
        }
        if self.artifact_type:
            descriptor["artifactType"] = self.artifact_type
        return descriptor

    def manifest(self) -> dict[str, Any]:
        """Return the parsed manifest."""
        parsed: dict[str, Any] = json.loads(self.manifest_bytes)
        return parsed


@dataclass(frozen=True)
class ImageIndex:
    """An OCI index or Docker manifest list with its per-platform images."""

    bytes: bytes
    digest: str
    media_type: str
    images: list[Image] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Return the length of the index in bytes."""
        return len(self.bytes)

    @property
    def hex(self) -> str:
        """Return the index digest without its `sha256:` prefix."""
        return self.digest.split(":", 1)[1]

    @property
    def manifest_digest(self) -> str:
        """Return the digest, named as `Image` names it."""
        return self.digest

    @property
    def manifest_bytes(self) -> builtins.bytes:
        """Return the bytes, named as `Image` names them."""
        return self.bytes

    @property
    def blobs(self) -> list[Blob]:
        """Return the blobs of every image in the index."""
        return [blob for image in self.images for blob in image.blobs]

    def image_for(self, os: str, arch: str) -> Image:
        """Return the image built for one platform."""
        for image in self.images:
            if image.platform[:2] == (os, arch):
                return image
        raise KeyError(f"no image for {os}/{arch} in {self.digest}")

    def descriptor(self) -> dict[str, Any]:
        """Return the descriptor of this index."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def seeded_bytes(seed: str, size: int) -> bytes:
    """Return `size` pseudo-random bytes that depend only on `seed`."""
    return random.Random(seed).randbytes(size)


def make_tar(files: Iterable[tuple[str, bytes]]) -> bytes:
    """Return an uncompressed tar of the files, with fixed owners and times."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_layer(seed: str, size: int, media_type: str = OCI_LAYER) -> tuple[Blob, str]:
    """Return a gzip'd tar layer holding `size` seeded bytes, and its diff id."""
    tar = make_tar([(f"data/{seed}.bin", seeded_bytes(seed, size))])
    compressed = gzip.compress(tar, compresslevel=1, mtime=0)
    return Blob.of(compressed, media_type), sha256_digest(tar)


def make_config(
    seed: str, diff_ids: Sequence[str], platform: Platform, media_type: str
) -> Blob:
    """Return an image config naming the platform and the layers' diff ids."""
    config: dict[str, Any] = {
        "architecture": platform[1],
        "os": platform[0],
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"], "Labels": {"test.seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": seed}],
    }
    if len(platform) == 3:
        config["variant"] = platform[2]
    return Blob.of(serialise(config), media_type)


def make_image(
    name_seed: str,
    layer_sizes: Sequence[int] = (1024, 4096),
    os: str = "linux",
    arch: str = "amd64",
    oci: bool = True,
    variant: str | None = None,
    annotations: dict[str, str] | None = None,
) -> Image:
    """Build an image whose every byte is determined by its arguments."""
    platform: Platform = (os, arch, variant) if variant else (os, arch)
    layer_type = OCI_LAYER if oci else DOCKER_LAYER
    built = [
        make_layer(f"{name_seed}/{os}/{arch}/{index}", size, layer_type)
        for index, size in enumerate(layer_sizes)
    ]
    layers = [layer for layer, _ in built]
    config_type = OCI_CONFIG if oci else DOCKER_CONFIG
    config = make_config(name_seed, [diff for _, diff in built], platform, config_type)

    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations and oci:
        manifest["annotations"] = annotations
    data = serialise(manifest)
    return Image(data, sha256_digest(data), media_type, config, layers, platform)


def platform_entry(platform: Platform) -> dict[str, str]:
    """Return the `platform` object of an index entry."""
    entry = {"architecture": platform[1], "os": platform[0]}
    if len(platform) == 3:
        entry["variant"] = platform[2]
    return entry


def make_index(
    seed: str,
    platforms: Sequence[Platform] = (("linux", "amd64"), ("linux", "arm64")),
    oci: bool = True,
    layer_sizes: Sequence[int] = (1024, 4096),
) -> ImageIndex:
    """Build an index (or Docker manifest list) with one image per platform."""
    images = [
        make_image(
            seed,
            layer_sizes,
            os=platform[0],
            arch=platform[1],
            oci=oci,
            variant=platform[2] if len(platform) == 3 else None,
        )
        for platform in platforms
    ]
    entries = [
        {**image.descriptor(), "platform": platform_entry(image.platform)}
        for image in images
    ]
    media_type = OCI_INDEX if oci else DOCKER_LIST
    index = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    data = serialise(index)
    return ImageIndex(data, sha256_digest(data), media_type, images)


def make_artifact(
    seed: str,
    subject: Image | ImageIndex,
    artifact_type: str = "application/vnd.example.sbom.v1+json",
    payload_size: int = 256,
    annotations: dict[str, str] | None = None,
) -> Image:
    """Build an OCI artifact manifest (signature, SBOM) that refers to `subject`."""
    config = Blob.of(b"{}", OCI_EMPTY)
    payload = Blob.of(seeded_bytes(seed, payload_size), artifact_type)
    subject_descriptor = subject.descriptor()
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config.descriptor(),
        "layers": [payload.descriptor()],
        "subject": subject_descriptor,
    }
    if annotations:
        manifest["annotations"] = annotations
    data = serialise(manifest)
    return Image(
        data,
        sha256_digest(data),
        OCI_MANIFEST,
        config,
        [payload],
        artifact_type=artifact_type,
        subject=subject_descriptor,
    )


def standard_content() -> dict[str, Image | ImageIndex]:
    """Return the images every real-upstream test can rely on, by `repo:tag`."""
    return {
        "multi/arch:1.0": make_index("multi-arch"),
        "docker/list:2.0": make_index("docker-list", oci=False),
        "single/docker:1": make_image("single-docker", oci=False),
        "single/oci:1": make_image("single-oci", layer_sizes=(2048, 1 << 20)),
        "single/oci:latest": make_image("single-oci-latest"),
        "single/oci:CaseTag": make_image("single-oci-case"),
        "a/b/c/d/e:1": make_image("a-b-c-d-e"),
    }


def raw_image(seed: str, layer_sizes: list[int]) -> Image:
    """Build an image whose layers are plain random bytes (quick to make)."""
    layers = [
        Blob.of(seeded_bytes(f"{seed}/{n}", size), OCI_LAYER)
        for n, size in enumerate(layer_sizes)
    ]
    config = Blob.of(serialise({"seed": seed, "os": "linux"}), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    data = serialise(manifest)
    return Image(data, sha256_digest(data), OCI_MANIFEST, config, layers)

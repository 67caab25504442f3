"""Image tarballs: `docker save` and OCI layout archives, gzip'd or plain.

An archive is read once, front to back, as a stream: a tar may be larger
than memory, and its table of contents (`manifest.json`, `index.json`)
usually comes last. Every file that may be a blob is hashed while it is
copied into a temporary file in the cache root; a file named by its digest
is checked against that name. Nothing becomes visible in the cache until
the whole archive has been read: then an image's blobs are moved into place
and, last of all, its manifests are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import gevent

from ociregistry.errors import RegistryError
from ociregistry.manifest import (
    DOCKER_IMAGE,
    MAX_MANIFEST_BYTES,
    Manifest,
    media_type_of,
    parse_json,
    sha256_digest,
)
from ociregistry.reference import check_digest
from ociregistry.store import (
    Store,
    fsync_file,
    raise_for_disk,
    with_suppressed_unlink,
)

log = logging.getLogger(__name__)

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

GZIP_MAGIC = b"\x1f\x8b"
TAR_MAGIC = b"ustar"
TAR_MAGIC_OFFSET = 257
CHUNK = 1024 * 1024
MAX_LINK_HOPS = 8
MAX_INDEX_DEPTH = 4
METADATA = frozenset({"manifest.json", "index.json", "repositories", "oci-layout"})
IGNORED = frozenset({"json", "VERSION"})  # legacy docker save layer metadata
_NAMED_BY_DIGEST = re.compile(r"(?:blobs/sha256/)?([a-f0-9]{64})(?:\.tar|\.json)?\Z")


class ArchiveInvalid(RegistryError):
    """Raised when an image tarball cannot be read or lacks what it names."""

    status = 400
    code = "UNSUPPORTED"


def is_tarball(path: str) -> bool:
    """Tell whether a file is a tar archive, gzip-compressed or not."""
    # TODO(loader): recognise zstd-compressed tarballs too — docker save,
    # skopeo and ctr write plain tars, so gzip covers what users compress.
    with open(path, "rb") as file:
        head = file.read(TAR_MAGIC_OFFSET + len(TAR_MAGIC))
    is_tar = head[TAR_MAGIC_OFFSET:] == TAR_MAGIC
    return head.startswith(GZIP_MAGIC) or is_tar


@dataclass
class StagedBlob:
    """A verified archive file in a temporary file (or already cached)."""

    hex: str
    size: int
    temp_path: str = ""  # empty once moved into the cache, or when cached
    is_gzip: bool = False


@dataclass
class ArchiveManifest:
    """A manifest found in (or built for) an archive, with its blobs' digests."""

    digest: str
    media_type: str
    data: bytes
    blobs: list[str] = field(default_factory=list)  # hex digests


@dataclass
class ArchiveImage:
    """One image of an archive: its manifests (index last) and its names."""

    digest: str
    manifests: list[ArchiveManifest] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # full references
    tag: str = ""  # a bare tag from `ref.name`, without a repository
    problem: str = ""  # why the image cannot be loaded, if it cannot

    @property
    def top(self) -> ArchiveManifest:
        """Return the manifest the image's names point at."""
        return self.manifests[-1]

    def label(self, path: str) -> str:
        """Return how to name the image in messages."""
        if self.names:
            return self.names[0]
        return f"{path}: {self.digest or 'unnamed image'}"


class _CountingReader:
    """A file wrapper that reports how many bytes were read."""

    def __init__(self, file: IO[bytes], on_read: Callable[[int], None]) -> None:
        self.file = file
        self.on_read = on_read

    def read(self, size: int = -1) -> bytes:
        """Read from the file, report the count, let other greenlets run."""
        data = self.file.read(size)
        self.on_read(len(data))
        gevent.sleep(0)
        return data


class Archive:
    """One image tarball, read into staged blobs and metadata files."""

    def __init__(self, store: Store, path: str) -> None:
        self.store = store
        self.path = path
        self.files: dict[str, StagedBlob] = {}  # by member name
        self.by_hex: dict[str, StagedBlob] = {}
        self.links: dict[str, str] = {}
        self.metadata: dict[str, bytes] = {}
        self.corrupt: dict[str, str] = {}  # by member name and by claimed hex

    # -- reading ---------------------------------------------------------------

    def read(self, on_read: Callable[[int], None]) -> None:
        """Read the whole archive; raise ArchiveInvalid when it is unreadable."""
        with open(self.path, "rb") as raw:
            source: Any = _CountingReader(raw, on_read)  # tarfile needs only read()
            try:
                with tarfile.open(fileobj=source, mode="r|*", bufsize=CHUNK) as tar:
                    for member in tar:
                        self._read_member(tar, member)
            except (tarfile.TarError, EOFError, zlib.error) as error:
                raise ArchiveInvalid(f"not a readable tarball: {error}") from None

    def _read_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _member_name(member.name)
        if member.issym():
            target = posixpath.join(posixpath.dirname(name), member.linkname)
            self.links[name] = _member_name(target)
        elif member.islnk():
            self.links[name] = _member_name(member.linkname)
        elif not member.isfile() or posixpath.basename(name) in IGNORED:
            return
        elif name in METADATA:
            if member.size > MAX_MANIFEST_BYTES:
                raise ArchiveInvalid(f"{name} is too large ({member.size} bytes)")
            file = tar.extractfile(member)
            self.metadata[name] = file.read() if file is not None else b""
        else:
            self._stage(tar, member, name)

    def _stage(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        """Copy a file to a temporary file, verified, unless it is known."""
        claimed = _NAMED_BY_DIGEST.match(name)
        claimed_hex = claimed.group(1) if claimed else ""
        known = self.by_hex.get(claimed_hex)
        file = tar.extractfile(member)
        if known is not None or file is None:
            if known is not None:
                self.files[name] = known
            return
        if claimed_hex and self.store.has_blob(claimed_hex):
            head = file.read(len(GZIP_MAGIC))
            blob = StagedBlob(claimed_hex, member.size, "", head == GZIP_MAGIC)
            self._keep(name, blob)
            return

        blob = self._copy(file, self.store.temp_path(claimed_hex or "load"))
        if claimed_hex and blob.hex != claimed_hex:
            with_suppressed_unlink(blob.temp_path)
            reason = f"{name}: content does not match its digest sha256:{claimed_hex}"
            self.corrupt[name] = self.corrupt[claimed_hex] = reason
            log.debug("corrupt archive member: %r in %r", name, self.path)
            return
        known = self.by_hex.get(blob.hex)
        if known is not None or self.store.has_blob(blob.hex):
            with_suppressed_unlink(blob.temp_path)
            blob = known or StagedBlob(blob.hex, blob.size, "", blob.is_gzip)
        self._keep(name, blob)

    def _keep(self, name: str, blob: StagedBlob) -> None:
        self.files[name] = blob
        self.by_hex.setdefault(blob.hex, blob)

    def _copy(self, source: IO[bytes], temp_path: str) -> StagedBlob:
        """Write a member to a temporary file while hashing it."""
        digest = hashlib.sha256()
        size, head = 0, b""
        try:
            with open(temp_path, "xb") as target:
                while chunk := source.read(CHUNK):
                    head = head or chunk[: len(GZIP_MAGIC)]
                    digest.update(chunk)
                    size += len(chunk)
                    target.write(chunk)
                target.flush()
                fsync_file(target.fileno())
        except BaseException as error:
            with_suppressed_unlink(temp_path)
            if isinstance(error, OSError):
                raise_for_disk(error, "a blob")
            raise
        return StagedBlob(digest.hexdigest(), size, temp_path, head == GZIP_MAGIC)

    def discard(self) -> None:
        """Remove every temporary file not moved into the cache."""
        for blob in list(self.files.values()) + list(self.by_hex.values()):
            if blob.temp_path:
                with_suppressed_unlink(blob.temp_path)
                blob.temp_path = ""

    # -- looking up ------------------------------------------------------------

    def member(self, name: str) -> StagedBlob:
        """Return the blob of a member, following links; raise if absent."""
        name = _member_name(name)
        for _ in range(MAX_LINK_HOPS):
            if name not in self.links:
                break
            name = self.links[name]
        blob = self.files.get(name)
        if blob is None:
            raise ArchiveInvalid(
                self.corrupt.get(name, f"{name} is not in the archive")
            )
        return blob

    def blob(self, digest: str) -> StagedBlob:
        """Return the blob of a digest, in the archive or the cache; raise."""
        hex_digest = check_digest(digest)
        blob = self.by_hex.get(hex_digest)
        if blob is not None:
            return blob
        if hex_digest in self.corrupt:
            raise ArchiveInvalid(self.corrupt[hex_digest])
        opened = self.store.open_blob(hex_digest)
        if opened is None:
            raise ArchiveInvalid(f"blob {digest} is not in the archive")
        os.close(opened[0])
        return StagedBlob(hex_digest, opened[1])

    def read_blob(self, blob: StagedBlob) -> bytes:
        """Return the bytes of a small blob (a manifest or a config)."""
        if blob.size > MAX_MANIFEST_BYTES:
            raise ArchiveInvalid(f"sha256:{blob.hex} is too large for a manifest")
        path = blob.temp_path or self.store.blob_path(blob.hex)
        with open(path, "rb") as file:
            return file.read()

    def take_blob(self, hex_digest: str) -> int:
        """Move a staged blob into the cache; return its size (0: cached)."""
        blob = self.by_hex.get(hex_digest)
        if self.store.has_blob(hex_digest):
            return 0
        if blob is None or not blob.temp_path:
            raise ArchiveInvalid(f"blob sha256:{hex_digest} is not in the archive")
        os.rename(blob.temp_path, self.store.blob_path(hex_digest))
        blob.temp_path = ""
        return blob.size


# -- layouts -------------------------------------------------------------------


def archive_images(archive: Archive) -> list[ArchiveImage]:
    """Return the images of a read archive: OCI layout first, else docker save."""
    if "index.json" in archive.metadata:
        return _oci_images(archive)
    if "manifest.json" in archive.metadata:
        return [_docker_image(archive, entry) for entry in _docker_entries(archive)]
    raise ArchiveInvalid("no index.json or manifest.json: not an image tarball")


def _oci_images(archive: Archive) -> list[ArchiveImage]:
    index = _json(archive.metadata["index.json"], "index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise ArchiveInvalid("index.json lists no manifests")
    images: dict[str, ArchiveImage] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            continue
        digest = entry["digest"]
        if digest not in images:
            media_type = str(entry.get("mediaType", ""))
            images[digest] = _oci_image(archive, digest, media_type)
        _add_names(images[digest], entry.get("annotations"))

    # A docker save of Docker 25 and later is an OCI layout whose names
    # may be only in manifest.json; match them by the image's config.
    repo_tags = _repo_tags_by_config(archive)
    for image in images.values():
        if not image.names and image.manifests:
            image.names = repo_tags.get(_config_hex(image.top), [])
    return list(images.values())


def _oci_image(archive: Archive, digest: str, media_type: str) -> ArchiveImage:
    image = ArchiveImage(digest)
    try:
        image.manifests = _manifests(archive, digest, media_type, 0)
    except RegistryError as error:
        image.problem = error.message
    return image


def _manifests(
    archive: Archive, digest: str, media_type: str, depth: int
) -> list[ArchiveManifest]:
    """Return a manifest and, for an index, its images in the archive first."""
    data = archive.read_blob(archive.blob(digest))
    if sha256_digest(data) != digest:
        raise ArchiveInvalid(f"manifest {digest} does not match its digest")
    manifest = Manifest(digest, media_type_of(data, media_type), data, [])
    if not manifest.is_index:
        blobs = [
            _checked_blob(archive, blob.digest, blob.size) for blob in manifest.blobs()
        ]
        return [ArchiveManifest(digest, manifest.media_type, data, blobs)]
    if depth >= MAX_INDEX_DEPTH:
        raise ArchiveInvalid(f"index {digest} is nested too deeply")

    found: list[ArchiveManifest] = []
    for child in manifest.children():
        try:
            archive.blob(child.digest)
        except RegistryError:
            log.debug("index entry not in the archive: %r", child.digest)
            continue
        found += _manifests(archive, child.digest, child.media_type, depth + 1)
    if not found:
        raise ArchiveInvalid(f"the archive holds none of the images of index {digest}")
    return [*found, ArchiveManifest(digest, manifest.media_type, data)]


def _checked_blob(archive: Archive, digest: str, size: int) -> str:
    blob = archive.blob(digest)
    if size >= 0 and blob.size != size:
        raise ArchiveInvalid(
            f"blob {digest} has {blob.size} bytes, its manifest says {size}"
        )
    return blob.hex


def _add_names(image: ArchiveImage, annotations: object) -> None:
    """Take the image's names from an index entry's annotations."""
    if not isinstance(annotations, dict):
        return
    for key in (CONTAINERD_NAME, REF_NAME):
        name = annotations.get(key)
        if not isinstance(name, str) or not name:
            continue
        # A `ref.name` may be a whole reference or only a tag.
        if any(mark in name for mark in "/:@"):
            if name not in image.names:
                image.names.append(name)
        elif not image.tag:
            image.tag = name


def _docker_entries(archive: Archive) -> list[Any]:
    entries = _json(archive.metadata["manifest.json"], "manifest.json")
    if not isinstance(entries, list):
        raise ArchiveInvalid("manifest.json is not a list of images")
    return entries


def _repo_tags_by_config(archive: Archive) -> dict[str, list[str]]:
    if "manifest.json" not in archive.metadata:
        return {}
    tags: dict[str, list[str]] = {}
    for entry in _docker_entries(archive):
        if not isinstance(entry, dict):
            continue
        named = _NAMED_BY_DIGEST.match(_member_name(str(entry.get("Config", ""))))
        if named and isinstance(entry.get("RepoTags"), list):
            tags[named.group(1)] = [str(tag) for tag in entry["RepoTags"]]
    return tags


def _config_hex(manifest: ArchiveManifest) -> str:
    config = parse_json(manifest.data).get("config")
    digest = config.get("digest") if isinstance(config, dict) else None
    return digest.split(":", 1)[-1] if isinstance(digest, str) else ""


def _docker_image(archive: Archive, entry: object) -> ArchiveImage:
    """Build the image of one `docker save` entry, with a manifest made for it."""
    image = ArchiveImage("")
    try:
        if not isinstance(entry, dict):
            raise ArchiveInvalid("manifest.json holds an entry that is not an object")
        image.names = [str(tag) for tag in entry.get("RepoTags") or []]
        config = archive.member(str(entry.get("Config", "")))
        layers = [archive.member(str(name)) for name in entry.get("Layers") or []]
        manifest = docker_manifest(archive, config, layers)
    except RegistryError as error:
        image.problem = error.message
        return image
    image.digest = manifest.digest
    image.manifests = [manifest]
    return image


def docker_manifest(
    archive: Archive, config: StagedBlob, layers: list[StagedBlob]
) -> ArchiveManifest:
    """Build a Docker schema 2 manifest for a saved image, byte-for-byte stable.

    Its layers are the tar members as saved, so an uncompressed layer's
    digest is its diff id; the config must agree.
    """
    parsed = _json(archive.read_blob(config), f"config sha256:{config.hex}")
    rootfs = parsed.get("rootfs") if isinstance(parsed, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise ArchiveInvalid(
            f"config sha256:{config.hex} does not list the {len(layers)} layers saved"
        )
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        if not layer.is_gzip and diff_id != f"sha256:{layer.hex}":
            raise ArchiveInvalid(
                f"layer sha256:{layer.hex} is not the diff id {diff_id} of its config"
            )

    document = {
        "schemaVersion": 2,
        "mediaType": DOCKER_IMAGE,
        "config": _docker_descriptor(DOCKER_CONFIG, config),
        "layers": [
            _docker_descriptor(
                DOCKER_LAYER_GZIP if layer.is_gzip else DOCKER_LAYER, layer
            )
            for layer in layers
        ],
    }
    data = json.dumps(document, indent=3).encode()
    blobs = [config.hex, *(layer.hex for layer in layers)]
    return ArchiveManifest(sha256_digest(data), DOCKER_IMAGE, data, blobs)


def _docker_descriptor(media_type: str, blob: StagedBlob) -> dict[str, Any]:
    return {"mediaType": media_type, "size": blob.size, "digest": f"sha256:{blob.hex}"}


def _member_name(name: str) -> str:
    """Normalise a member name: no `./` prefix, no leading slash."""
    return posixpath.normpath(name).lstrip("/")


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ArchiveInvalid(f"{what} is not valid JSON: {error}") from None

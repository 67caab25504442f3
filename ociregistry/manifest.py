"""Manifest media types, parsing, and the on-disk manifest record."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ociregistry.errors import ManifestInvalid

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_IMAGE = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_IMAGE = "application/vnd.oci.image.manifest.v1+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# The Go server's type codes and the record key of each parsed manifest.
TYPE_CODES = {DOCKER_LIST: 0, DOCKER_IMAGE: 1, OCI_INDEX: 2, OCI_IMAGE: 3}
TYPE_KEYS = {
    0: "v2.docker.manifestList",
    1: "v2.docker.manifest",
    2: "v1.oci.index",
    3: "v1.oci.manifest",
}
OTHER_TYPE = 4
MEDIA_TYPES_BY_CODE = {code: media for media, code in TYPE_CODES.items()}
INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})

ACCEPT = ", ".join([OCI_INDEX, OCI_IMAGE, DOCKER_LIST, DOCKER_IMAGE, DOCKER_V1_SIGNED])
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


def now_stamp() -> str:
    """Return the local time as the records store it."""
    return datetime.datetime.now().strftime(TIME_FORMAT)


def sha256_digest(data: bytes) -> str:
    """Return the sha256 digest of bytes, with its algorithm prefix."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_json(data: bytes) -> dict[str, Any]:
    """Parse manifest bytes into a JSON object; raise ManifestInvalid."""
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ManifestInvalid(f"manifest is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    return parsed


def media_type_of(data: bytes, header: str) -> str:
    """Return a manifest's media type: its own field, else the header's."""
    declared = parse_json(data).get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    header = header.split(";")[0].strip()
    if header and header not in ("application/json", "text/plain"):
        return header
    parsed = parse_json(data)
    return OCI_INDEX if "manifests" in parsed else OCI_IMAGE


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob or manifest."""

    digest: str
    size: int
    media_type: str = ""
    platform: dict[str, Any] = field(default_factory=dict)


def _descriptor(entry: Any) -> Descriptor | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
        return None
    size = entry.get("size")
    platform = entry.get("platform")
    return Descriptor(
        digest=entry["digest"],
        size=size if isinstance(size, int) else -1,
        media_type=str(entry.get("mediaType", "")),
        platform=platform if isinstance(platform, dict) else {},
    )


@dataclass
class Manifest:
    """One cached manifest: its exact bytes, identity and timestamps."""

    digest: str
    media_type: str
    data: bytes
    image_urls: list[str]
    created: str = field(default_factory=now_stamp)
    pulled: str = field(default_factory=now_stamp)

    @property
    def hex(self) -> str:
        """Return the digest without its algorithm prefix."""
        return self.digest.split(":", 1)[1]

    @property
    def is_index(self) -> bool:
        """Tell whether this is an index (manifest list)."""
        return self.media_type in INDEX_TYPES

    def parsed(self) -> dict[str, Any]:
        """Return the manifest parsed as JSON."""
        return parse_json(self.data)

    def children(self) -> list[Descriptor]:
        """Return the manifests an index lists."""
        entries = self.parsed().get("manifests")
        found = [_descriptor(e) for e in entries] if isinstance(entries, list) else []
        return [d for d in found if d is not None]

    def blobs(self) -> list[Descriptor]:
        """Return the config and layers an image manifest references."""
        parsed = self.parsed()
        entries = [parsed.get("config")]
        layers = parsed.get("layers")
        if isinstance(layers, list):
            entries.extend(layers)
        found = [_descriptor(e) for e in entries]
        return [d for d in found if d is not None]

    def subject(self) -> Descriptor | None:
        """Return the manifest this one refers to (OCI `subject`), if any."""
        return _descriptor(self.parsed().get("subject"))

    def size_of_layers(self) -> int:
        """Return the sum of the layer sizes (0 for an index)."""
        layers = self.parsed().get("layers")
        if not isinstance(layers, list):
            return 0
        return sum(d.size for d in map(_descriptor, layers) if d and d.size > 0)

    def to_record(self) -> bytes:
        """Serialize as a record the Go ociregistry can read too."""
        code = TYPE_CODES.get(self.media_type, OTHER_TYPE)
        record: dict[str, Any] = {
            "type": code,
            "digest": self.hex,
            "imageUrl": self.image_urls[0],
            "bytes": base64.b64encode(self.data).decode("ascii"),
            "created": self.created,
            "pulled": self.pulled,
            "mediaType": self.media_type,
            "imageUrls": self.image_urls,
        }
        if code in TYPE_KEYS:
            record[TYPE_KEYS[code]] = self.parsed()
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def from_record(cls, raw: bytes) -> Manifest:
        """Read a record (ours or the Go server's); raise ManifestInvalid."""
        record = parse_json(raw)
        try:
            data = base64.b64decode(record["bytes"], validate=True)
            code = int(record.get("type", OTHER_TYPE))
            media_type = record.get("mediaType") or MEDIA_TYPES_BY_CODE.get(code)
            urls = record.get("imageUrls") or [record["imageUrl"]]
            manifest = cls(
                digest="sha256:" + str(record["digest"]),
                media_type=media_type or media_type_of(data, ""),
                data=data,
                image_urls=[str(url) for url in urls],
                created=str(record.get("created", "")),
                pulled=str(record.get("pulled", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestInvalid(f"unreadable manifest record: {error}") from None
        if sha256_digest(data) != manifest.digest:
            raise ManifestInvalid("manifest record bytes do not match its digest")
        return manifest


def pick_platform(
    children: list[Descriptor], os_name: str, arch: str
) -> Descriptor | None:
    """Return the index entry for a platform (os/arch[/variant]), if any."""
    arch, _, variant = arch.partition("/")
    for child in children:
        platform = child.platform
        if platform.get("os") != os_name or platform.get("architecture") != arch:
            continue
        if variant and platform.get("variant", variant) != variant:
            continue
        return child
    return None

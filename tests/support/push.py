"""Push test images to a registry that speaks the distribution API."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urljoin

import urllib3

from support.images import Blob, Image, ImageIndex

TIMEOUT = urllib3.Timeout(connect=5.0, read=30.0)


class PushError(Exception):
    """Raised when the registry refuses part of a push."""

    def __init__(self, what: str, response: urllib3.BaseHTTPResponse):
        self.status = response.status
        self.body = response.data.decode(errors="replace")
        super().__init__(f"{what}: HTTP {self.status}: {self.body[:500]}")


class Pusher:
    """Upload blobs and manifests to one registry, optionally with basic auth."""

    def __init__(
        self,
        base_url: str,
        basic_auth: tuple[str, str] | None = None,
        ca_certs: str | None = None,
        pool: urllib3.PoolManager | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.headers: dict[str, str] = {}
        if basic_auth:
            self.headers.update(urllib3.make_headers(basic_auth=":".join(basic_auth)))
        self.pool = pool or urllib3.PoolManager(
            timeout=TIMEOUT, retries=False, ca_certs=ca_certs
        )

    def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request with the credentials, without following redirects."""
        return self.pool.request(
            method,
            url,
            body=body,
            headers={**self.headers, **(headers or {})},
            redirect=False,
        )

    def has_blob(self, repo: str, blob: Blob) -> bool:
        """Tell whether the repository already holds the blob."""
        url = f"{self.base_url}/v2/{repo}/blobs/{blob.digest}"
        return self.request("HEAD", url).status == 200

    def push_blob(self, repo: str, blob: Blob) -> None:
        """Upload a blob in one PUT, unless the registry already has it."""
        if self.has_blob(repo, blob):
            return

        start = self.request("POST", f"{self.base_url}/v2/{repo}/blobs/uploads/")
        if start.status != 202:
            raise PushError(f"starting upload of {blob.digest}", start)

        location = urljoin(self.base_url + "/", start.headers["Location"])
        separator = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream"}
        url = f"{location}{separator}digest={blob.digest}"
        done = self.request("PUT", url, body=blob.data, headers=headers)
        if done.status != 201:
            raise PushError(f"uploading {blob.digest}", done)

    def push_manifest(
        self, repo: str, reference: str, data: bytes, media_type: str
    ) -> None:
        """Put a manifest under a tag or digest, with its own media type."""
        url = f"{self.base_url}/v2/{repo}/manifests/{reference}"
        response = self.request(
            "PUT", url, body=data, headers={"Content-Type": media_type}
        )
        if response.status != 201:
            raise PushError(f"putting manifest {repo}:{reference}", response)

    def push_image(self, repo: str, reference: str, image: Image) -> None:
        """Push an image's blobs, then its manifest under `reference`."""
        for blob in image.blobs:
            self.push_blob(repo, blob)
        self.push_manifest(repo, reference, image.manifest_bytes, image.media_type)

    def push_index(self, repo: str, reference: str, index: ImageIndex) -> None:
        """Push every image of an index by digest, then the index itself."""
        for image in index.images:
            self.push_image(repo, image.manifest_digest, image)
        self.push_manifest(repo, reference, index.bytes, index.media_type)

    def push(self, repo: str, reference: str, item: Image | ImageIndex) -> None:
        """Push an image or an index."""
        if isinstance(item, ImageIndex):
            self.push_index(repo, reference, item)
        else:
            self.push_image(repo, reference, item)


def split_reference(name: str) -> tuple[str, str]:
    """Split `repo:tag` or `repo@digest` into the repository and reference."""
    if "@" in name:
        repo, reference = name.split("@", 1)
        return repo, reference
    repo, _, tag = name.rpartition(":")
    return repo, tag


def push_image(
    base_url: str,
    repo: str,
    tag: str,
    image: Image,
    basic_auth: tuple[str, str] | None = None,
) -> None:
    """Push one image to `base_url` as `repo:tag`."""
    Pusher(base_url, basic_auth).push_image(repo, tag, image)


def push_index(
    base_url: str,
    repo: str,
    tag: str,
    index: ImageIndex,
    basic_auth: tuple[str, str] | None = None,
) -> None:
    """Push an index and its images to `base_url` as `repo:tag`."""
    Pusher(base_url, basic_auth).push_index(repo, tag, index)


def push_content(
    base_url: str,
    content: Mapping[str, Image | ImageIndex],
    basic_auth: tuple[str, str] | None = None,
    ca_certs: str | None = None,
) -> None:
    """Push every `repo:tag` → image or index of a content table."""
    pusher = Pusher(base_url, basic_auth, ca_certs)
    for name, item in content.items():
        repo, reference = split_reference(name)
        pusher.push(repo, reference, item)

"""Parse request paths into upstream, repository and reference, and check them."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from ociregistry.errors import Denied, DigestInvalid, NameInvalid, RegistryError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

MAX_NAME_LENGTH = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_SHA256 = re.compile(r"sha256:[a-f0-9]{64}\Z")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z")
_HOST = re.compile(
    r"(?:localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z"
)


class TagInvalid(RegistryError):
    """Raised when a manifest reference is neither a valid tag nor a digest."""

    status = 400
    code = "TAG_INVALID"


@dataclass(frozen=True)
class Repository:
    """A repository at one upstream, e.g. registry.k8s.io + kube-scheduler."""

    upstream: str
    name: str

    @property
    def url(self) -> str:
        """Return the repository URL, as image URLs begin."""
        return f"{self.upstream}/{self.name}"

    def image_url(self, reference: str) -> str:
        """Return the image URL of a tag or digest in this repository."""
        separator = "@" if is_digest(reference) else ":"
        return f"{self.url}{separator}{reference}"


def is_digest(reference: str) -> bool:
    """Tell whether a manifest reference is a digest rather than a tag."""
    return ":" in reference


def looks_like_host(segment: str) -> bool:
    """Tell whether a path segment names a registry host (has . or :)."""
    return "." in segment or ":" in segment or segment == "localhost"


def check_digest(digest: str) -> str:
    """Return the hex of a sha256 digest; raise DigestInvalid otherwise."""
    if _SHA256.match(digest):
        return digest[7:]
    if _ANY_DIGEST.match(digest) and not digest.startswith("sha256:"):
        raise DigestInvalid(f"unsupported digest algorithm: {digest[:80]!r}")
    raise DigestInvalid(f"invalid digest: {digest[:80]!r}")


def check_reference(reference: str) -> str:
    """Return a valid tag or sha256 digest; raise otherwise."""
    if is_digest(reference):
        check_digest(reference)
    elif not _TAG.match(reference):
        raise TagInvalid(f"invalid tag: {reference[:140]!r}")
    return reference


def normalize_upstream(host: str) -> str:
    """Return the canonical name of an upstream host (lowercase, docker.io)."""
    host = host.strip().lower()
    if not _HOST.match(host):
        raise NameInvalid(f"invalid upstream registry host: {host[:100]!r}")
    if host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return host


def api_host(upstream: str) -> str:
    """Return the host:port the upstream's API is served on."""
    return DOCKER_HUB_API if upstream == DOCKER_HUB else upstream


def check_name(name: str) -> str:
    """Return a valid repository name; raise NameInvalid otherwise."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name must be 1 to {MAX_NAME_LENGTH} characters")
    for component in name.split("/"):
        if not _COMPONENT.match(component):
            raise NameInvalid(f"invalid repository name: {name[:100]!r}")
    return name


@dataclass(frozen=True)
class UpstreamPolicy:
    """Decide which upstream a request goes to, and whether it may."""

    default_ns: str = ""
    allowed: tuple[str, ...] = ()

    def resolve(self, path_name: str, header: str, ns: str) -> Repository:
        """Return the repository a request names (SPEC §3 order)."""
        explicit = header or ns
        if explicit:
            upstream, name = normalize_upstream(explicit), path_name
        else:
            first, _, rest = path_name.partition("/")
            if rest and looks_like_host(first):
                upstream, name = normalize_upstream(first), rest
            elif self.default_ns:
                upstream, name = normalize_upstream(self.default_ns), path_name
            else:
                raise NameInvalid(
                    "no upstream named: use an in-path namespace "
                    "(/v2/registry.k8s.io/pause/...), ?ns=, the X-Registry "
                    "header, or start the server with --default-ns"
                )
        self.check_allowed(upstream)
        name = check_name(name)
        if upstream == DOCKER_HUB and "/" not in name:
            name = f"library/{name}"
        return Repository(upstream, name)

    def check_allowed(self, upstream: str) -> None:
        """Raise Denied unless the allow-list (if any) admits the upstream."""
        if not self.allowed:
            return
        for pattern in self.allowed:
            if fnmatch.fnmatchcase(upstream, pattern.lower()):
                return
        raise Denied(f"upstream {upstream} is not in allowedUpstreams")

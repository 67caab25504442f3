"""Talk to upstream registries: pools, auth challenges, tokens, redirects."""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import gevent
import urllib3
from gevent.lock import BoundedSemaphore
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)

from ociregistry.config import Settings, TlsSettings
from ociregistry.credentials import CredentialSource, Login
from ociregistry.errors import (
    BlobUnknown,
    ManifestUnknown,
    RegistryError,
    UpstreamError,
    UpstreamTimeout,
)
from ociregistry.manifest import ACCEPT, MAX_MANIFEST_BYTES
from ociregistry.reference import Repository, api_host

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
DEFAULT_TOKEN_LIFETIME = 60.0
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


@dataclass(frozen=True)
class Challenge:
    """A parsed WWW-Authenticate header."""

    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        """Parse `Bearer realm="…",service="…"` and `Basic realm="…"`."""
        scheme, _, rest = header.strip().partition(" ")
        params = {
            key.lower(): quoted or bare
            for key, quoted, bare in _CHALLENGE_PARAM.findall(rest)
        }
        return cls(scheme.lower(), params)


class Upstream:
    """One upstream registry: its pool, credentials and token cache."""

    def __init__(self, name: str, settings: Settings) -> None:
        entry = settings.registry(name)
        self.name = name
        self.base_url = f"{entry.scheme}://{api_host(name)}"
        self.credentials = CredentialSource(name, entry.auth)
        self.timeout = settings.pull_timeout
        self.pool = _make_pool(entry.tls, settings.pull_timeout)
        self.limit = (
            BoundedSemaphore(entry.max_concurrent) if entry.max_concurrent else None
        )
        self._tokens: dict[str, tuple[str, float]] = {}
        self._wants_basic = False

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the upstream's concurrent-request slots (maxConcurrent)."""
        if self.limit is None:
            yield
            return
        if not self.limit.acquire(timeout=self.timeout):
            raise UpstreamTimeout(self.name, "no free connection slot in time")
        try:
            yield
        finally:
            self.limit.release()

    def request(
        self, method: str, path: str, scope: str, accept: str = "", stream: bool = False
    ) -> urllib3.BaseHTTPResponse:
        """Send a request, answering one auth challenge; map transport errors."""
        headers = {"Accept": accept} if accept else {}
        response = self._send(method, path, headers, scope, stream)
        if response.status != 401:
            return response
        challenge = Challenge.parse(response.headers.get("WWW-Authenticate", ""))
        response.drain_conn()
        self._answer(challenge, scope)
        return self._send(method, path, headers, scope, stream)

    def _send(
        self, method: str, path: str, headers: dict[str, str], scope: str, stream: bool
    ) -> urllib3.BaseHTTPResponse:
        headers = {**headers, **self.auth_header(scope)}
        return self.call(
            method, self.base_url + path, headers=headers, preload_content=not stream
        )

    def call(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        preload_content: bool = True,
    ) -> urllib3.BaseHTTPResponse:
        """Make one HTTP request; raise UpstreamError/UpstreamTimeout on failure."""
        try:
            return self.pool.request(
                method,
                url,
                headers=headers,
                preload_content=preload_content,
                redirect=False,
                retries=False,
            )
        except NewConnectionError as error:
            # Checked first: urllib3 makes it a subclass of ConnectTimeoutError.
            raise UpstreamError(self.name, f"unreachable: {_reason(error)}") from None
        except (ConnectTimeoutError, ReadTimeoutError) as error:
            raise UpstreamTimeout(self.name, f"timed out: {_reason(error)}") from None
        except SSLError as error:
            reason = _tls_reason(error)
            raise UpstreamError(self.name, f"TLS failure: {reason}") from None
        except HTTPError as error:
            if "timed out" in str(error):
                raise UpstreamTimeout(
                    self.name, f"timed out: {_reason(error)}"
                ) from None
            raise UpstreamError(self.name, f"unreachable: {_reason(error)}") from None
        except (OSError, ssl.SSLError) as error:
            raise UpstreamError(self.name, f"unreachable: {error}") from None

    def auth_header(self, scope: str) -> dict[str, str]:
        """Return the Authorization header to send for a scope, if any."""
        static = self.credentials.static_token()
        if static:
            return {"Authorization": f"Bearer {static}"}
        token = self._tokens.get(scope)
        if token is not None and token[1] > time.monotonic():
            return {"Authorization": f"Bearer {token[0]}"}
        login = self.credentials.login()
        if self._wants_basic and login is not None:
            return {"Authorization": _basic(login)}
        return {}

    def _answer(self, challenge: Challenge, scope: str) -> None:
        if challenge.scheme == "bearer" and "realm" in challenge.params:
            self._tokens[scope] = self._fetch_token(challenge, scope)
        elif challenge.scheme == "basic" and self.credentials.login() is not None:
            self._wants_basic = True
        else:
            raise UpstreamError(self.name, "authentication required", status=502)

    def _fetch_token(self, challenge: Challenge, scope: str) -> tuple[str, float]:
        params = {"service": challenge.params.get("service", "")}
        params["scope"] = challenge.params.get("scope") or scope
        url = f"{challenge.params['realm']}?{urlencode(params)}"
        login = self.credentials.login()
        headers = {"Authorization": _basic(login)} if login else {}
        response = self.call("GET", url, headers=headers)
        if response.status != 200:
            raise UpstreamError(
                self.name, f"token service answered {response.status}", status=502
            )
        try:
            answer = response.json()
            token = str(answer.get("token") or answer["access_token"])
            lifetime = float(answer.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UpstreamError(self.name, "token service gave no token") from None
        log.debug("got upstream token: %r scope %r", self.name, scope)
        # Renew a little early so a token never expires mid-request.
        return token, time.monotonic() + max(lifetime - 5.0, 1.0)


class UpstreamClient:
    """Fetch manifests and blobs from any number of upstreams."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._upstreams: dict[str, Upstream] = {}

    def upstream(self, name: str) -> Upstream:
        """Return the (cached) connection state of an upstream."""
        found = self._upstreams.get(name)
        if found is None:
            found = self._upstreams[name] = Upstream(name, self.settings)
        return found

    def fetch_manifest(self, repo: Repository, reference: str) -> tuple[bytes, str]:
        """GET a manifest; return its bytes and Content-Type."""
        upstream = self.upstream(repo.upstream)
        path = f"/v2/{repo.name}/manifests/{reference}"
        with upstream.slot(), gevent.Timeout(upstream.timeout, False):
            response = upstream.request(
                "GET", path, _scope(repo), accept=ACCEPT, stream=True
            )
            try:
                _raise_for_status(response, upstream, repo, reference, ManifestUnknown)
                data = _read_manifest(response, upstream)
            finally:
                finish(response)
            if len(data) > MAX_MANIFEST_BYTES:
                raise UpstreamError(upstream.name, "manifest is larger than 4 MiB")
            return data, response.headers.get("Content-Type", "")
        raise UpstreamTimeout(
            upstream.name, f"no manifest within {upstream.timeout:g}s"
        )

    def head_manifest(self, repo: Repository, reference: str) -> tuple[str, str]:
        """HEAD a manifest; return its digest (may be "") and media type."""
        upstream = self.upstream(repo.upstream)
        path = f"/v2/{repo.name}/manifests/{reference}"
        with upstream.slot(), gevent.Timeout(upstream.timeout, False):
            response = upstream.request("HEAD", path, _scope(repo), accept=ACCEPT)
            _raise_for_status(response, upstream, repo, reference, ManifestUnknown)
            headers = response.headers
            return headers.get("Docker-Content-Digest", ""), headers.get(
                "Content-Type", ""
            )
        raise UpstreamTimeout(upstream.name, f"no answer within {upstream.timeout:g}s")

    def open_blob(self, repo: Repository, digest: str) -> urllib3.BaseHTTPResponse:
        """GET a blob, following redirects; return the streaming response."""
        upstream = self.upstream(repo.upstream)
        path = f"/v2/{repo.name}/blobs/{digest}"
        response = upstream.request("GET", path, _scope(repo), stream=True)
        url = upstream.base_url + path
        for _ in range(MAX_REDIRECTS):
            if response.status not in (301, 302, 303, 307, 308):
                break
            location = response.headers.get("Location", "")
            response.drain_conn()
            url = urljoin(url, location)
            response = self._follow(upstream, url, _scope(repo))
        _raise_for_status(response, upstream, repo, digest, BlobUnknown)
        return response

    def _follow(
        self, upstream: Upstream, url: str, scope: str
    ) -> urllib3.BaseHTTPResponse:
        # Storage back-ends sign their redirect URLs; our credentials are for
        # the registry and must not reach another host.
        same_host = urlsplit(url).netloc == urlsplit(upstream.base_url).netloc
        headers = upstream.auth_header(scope) if same_host else {}
        return upstream.call("GET", url, headers=headers, preload_content=False)

    def close(self) -> None:
        """Release every pooled connection."""
        for upstream in self._upstreams.values():
            upstream.pool.clear()


def _read_manifest(response: urllib3.BaseHTTPResponse, upstream: Upstream) -> bytes:
    """Read a manifest body (one byte past the limit); map a broken transfer."""
    try:
        return response.read(MAX_MANIFEST_BYTES + 1)
    except ReadTimeoutError:
        raise UpstreamTimeout(upstream.name, "manifest download timed out") from None
    except (HTTPError, OSError) as error:
        reason = f"manifest download broke off: {error}"[:300]
        raise UpstreamError(upstream.name, reason) from None


def finish(response: urllib3.BaseHTTPResponse) -> None:
    """Give a response's connection back to its pool, closed if body is left.

    A connection whose body was not read to the end cannot carry another
    request; returned as it is, the next request on it would fail.
    """
    if not response.closed:
        response.close()
    response.release_conn()


def _scope(repo: Repository) -> str:
    return f"repository:{repo.name}:pull"


def _basic(login: Login) -> str:
    raw = f"{login.user}:{login.secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None) or error
    return str(reason).split(": ", 1)[-1][:200]


def _tls_reason(error: SSLError) -> str:
    """Return what the ssl module says went wrong, without its decorations."""
    cause = error.args[0] if error.args else error
    verify_message = getattr(cause, "verify_message", None)
    if verify_message:
        return f"certificate verify failed: {verify_message}"
    reason = getattr(cause, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return _reason(error)


def _raise_for_status(
    response: urllib3.BaseHTTPResponse,
    upstream: Upstream,
    repo: Repository,
    reference: str,
    unknown: type[RegistryError],
) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    response.drain_conn()
    if status == 404:
        raise unknown(f"{repo.image_url(reference)} not found upstream")
    if status in (401, 403):
        raise UpstreamError(upstream.name, f"refused access ({status}) to {repo.name}")
    if status == 429:
        raise UpstreamError(upstream.name, "rate limit reached (429)")
    raise UpstreamError(
        upstream.name, f"answered {status} for {repo.image_url(reference)}"
    )


def _make_pool(tls: TlsSettings | None, timeout: float) -> urllib3.PoolManager:
    tls = tls or TlsSettings()
    options: dict[str, object] = {
        "num_pools": 16,
        "maxsize": 32,
        "block": False,
        "timeout": urllib3.Timeout(connect=min(timeout, 30.0), read=timeout),
    }
    if tls.insecure_skip_verify:
        options["cert_reqs"] = "CERT_NONE"
        options["assert_hostname"] = False
    else:
        options["cert_reqs"] = "CERT_REQUIRED"
        if tls.ca:
            options["ca_certs"] = tls.ca
    if tls.cert:
        options["cert_file"] = tls.cert
        options["key_file"] = tls.key or None
    return urllib3.PoolManager(**options)  # type: ignore[arg-type]

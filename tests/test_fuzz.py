"""Fuzz the request surface: paths, query strings, headers and methods.

Hypothesis builds requests from the API's own words mixed with random text
and sends them, raw, to a server in front of a fake upstream. Whatever it
sends, the server must answer: never a 500, an OCI error body for every
error, no traceback in its log, and no file written outside its cache root.
"""

from __future__ import annotations

import json
import os
import socket
from http.client import HTTPResponse
from pathlib import Path
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cache_checks import assert_cache_sound
from support.images import make_image

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
ADMIN_TOKEN = "fuzz-admin-token-never-sent"
REPO = "app/fuzz"
CACHE_LAYOUT = {"blobs", "img", "lts", ".tmp", ".locks"}
METHODS = ["GET", "GET", "GET", "HEAD", "DELETE", "PUT", "POST", "PATCH", "OPTIONS"]
PREFIXES = ["/v2/", "/cmd/", "/", "//v2/"]
ADMIN_PATHS = ["prune", "image/list", "manifest/list", "blob/list", "stop", "x"]
API_WORDS = [
    "manifests",
    "blobs",
    "tags",
    "list",
    "referrers",
    "_catalog",
    "uploads",
    "image",
    "manifest",
    "blob",
    "prune",
    "stop",
    "health",
    "auth",
    "latest",
    "1",
    "..",
    ".",
    "",
    "library",
    "app",
    "fuzz",
    "localhost",
    "docker.io",
    "sha256:" + "0" * 64,
    "sha256:xyz",
    "sha512:" + "a" * 128,
    "a" * 300,
]
QUERY_KEYS = [
    "ns",
    "n",
    "last",
    "pattern",
    "count",
    "digest",
    "substr",
    "type",
    "dur",
    "expr",
    "dryRun",
    "artifactType",
]
HEADER_NAMES = [
    "X-Registry",
    "Range",
    "Accept",
    "Authorization",
    "If-None-Match",
    "Content-Type",
    "X-Forwarded-For",
    "Host",
    "User-Agent",
]
# Header values: anything but the bytes that end a header line.
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
)
# Raw bytes, which are seldom valid UTF-8.
HEADER_BYTES = st.binary(max_size=20).map(
    lambda data: bytes(byte for byte in data if byte >= 0x20).decode("latin-1")
)


def segments(words: list[str]) -> st.SearchStrategy[str]:
    """A path segment: an API word, a name in play, or random text."""
    random_text = st.text(max_size=20).map(lambda text: quote(text, safe=""))
    raw_text = st.text(st.sampled_from("%.:@;,=+$!*'()~-_aZ09"), max_size=8)
    return st.one_of(st.sampled_from(words), random_text, raw_text)


def joined(parts: st.SearchStrategy[str], most: int) -> st.SearchStrategy[str]:
    """Segments joined by slashes: a repository name, or any path."""
    return st.lists(parts, min_size=1, max_size=most).map("/".join)


def paths(words: list[str]) -> st.SearchStrategy[str]:
    """A request path: one of the API's shapes with fuzzed parts, or noise."""
    part = segments(words)
    name = joined(part, 4)
    shapes = [
        st.builds("/v2/{}/manifests/{}".format, name, part),
        st.builds("/v2/{}/blobs/{}".format, name, part),
        st.builds("/v2/{}/tags/list".format, name),
        st.builds("/v2/{}/referrers/{}".format, name, part),
        st.builds("/v2/{}/blobs/uploads/{}".format, name, part),
        st.builds("/cmd/{}".format, st.sampled_from(ADMIN_PATHS)),
        st.sampled_from(["/v2/", "/v2/_catalog", "/v2/auth", "/v2", "/"]),
        st.builds("{}{}".format, st.sampled_from(PREFIXES), joined(part, 7)),
    ]
    return st.one_of(shapes)


@st.composite
def fuzzed_requests(draw, words: list[str], upstreams: list[str]) -> bytes:
    """Draw a whole raw HTTP/1.1 request."""
    method = draw(st.sampled_from(METHODS))
    path = draw(paths(words))
    values = st.one_of(
        st.sampled_from(upstreams),
        st.integers(-5, 10**20).map(str),
        HEADER_TEXT,
        HEADER_BYTES,
    )
    query = draw(
        st.lists(
            st.tuples(st.sampled_from(QUERY_KEYS) | st.text(max_size=5), values),
            max_size=4,
        )
    )
    if query:
        path += "?" + "&".join(
            f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in query
        )
    headers = draw(
        st.dictionaries(
            st.sampled_from(HEADER_NAMES)
            | st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True),
            st.one_of(
                values,
                st.builds("bytes={}-{}".format, st.integers(0, 99), values),
            ),
            max_size=4,
        )
    )
    headers.setdefault("Host", "fuzz")
    head = [f"{method} {path} HTTP/1.1"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head += ["Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1")


def send(server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a raw request; return status, headers and body."""
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(request)
        response = HTTPResponse(sock, method=request.split(b" ", 1)[0].decode())
        response.begin()
        body = response.read()
        return response.status, dict(response.getheaders()), body


def assert_sound_answer(request: bytes, status: int, headers, body: bytes) -> None:
    """Check that an answer is no 500 and that an error carries a reason."""
    assert status < 500 or status in (502, 504), (status, body[:300])
    method, target = request.split(b" ", 2)[:2]
    if status < 400 or method == b"HEAD":
        return
    if target.startswith(b"/cmd/") and headers["Content-Type"].startswith("text/"):
        assert body.strip(), "an admin error without a reason"
        return
    errors = json.loads(body)["errors"]
    assert errors and errors[0]["code"] and errors[0]["message"], body


def snapshot(top: Path, skip: set[Path]) -> set[str]:
    """List every path under `top`, except those under `skip`."""
    found = set()
    for directory, names, files in os.walk(top):
        if Path(directory) in skip:
            names.clear()
            continue
        found.update(os.path.join(directory, name) for name in names + files)
    return found


def test_fuzzed_requests_never_crash_or_write_outside_the_cache_root(
    oci_server, fake_upstream, cache_root, tmp_path
):
    fake = fake_upstream()
    image = make_image("fuzz")
    fake.add_image(REPO, "1", image)
    config = {
        "registries": [fake.registry_config()],
        "allowedUpstreams": [fake.host_port],
        "adminApi": {"token": ADMIN_TOKEN},
    }
    server = oci_server(
        "--default-ns", fake.host_port, "--pull-timeout", "5000", config=config
    )
    words = [*API_WORDS, fake.host_port, image.digest, image.config.digest]
    upstreams = [fake.host_port, "docker.io", "127.0.0.1:1", "evil.example", ""]
    assert (
        send(server, f"GET /v2/{REPO}/manifests/1 HTTP/1.1\r\n\r\n".encode())[0] == 200
    )
    # The whole session's temporary tree, but for the cache and server logs.
    top = tmp_path.parent
    skip = {cache_root, server.workdir}
    before = snapshot(top, skip)
    answered = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize="FUZZ_EXAMPLES" not in os.environ,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(fuzzed_requests(words, upstreams))
    def answers_soundly(request: bytes) -> None:
        status, headers, body = send(server, request)
        answered.append(status)
        assert_sound_answer(request, status, headers, body)

    answers_soundly()

    print(f"\nfuzz: {len(answered)} requests, statuses {sorted(set(answered))}")
    assert server.is_running()
    assert "Traceback" not in server.read_log()
    assert snapshot(top, skip) == before
    assert {path.name for path in cache_root.iterdir()} <= CACHE_LAYOUT
    assert_cache_sound(cache_root)

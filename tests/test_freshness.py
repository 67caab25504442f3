"""Tag freshness: TTL re-validation with a HEAD, and serving stale copies."""

from __future__ import annotations

import logging
import time

import gevent
import pytest
from gevent.event import Event
from support.fake_upstream import Status
from support.images import make_image
from support.processes import wait_until
from support.push import Pusher

from ociregistry.config import RegistrySettings, Settings
from ociregistry.errors import ManifestUnknown, UpstreamError
from ociregistry.freshness import TagFreshness
from ociregistry.manifest import Manifest, now_stamp
from ociregistry.reference import Repository

HOST = "127.0.0.9"
REPO = Repository(HOST, "fresh/app")
URL = REPO.image_url("1")
CACHED = "sha256:" + "a" * 64
MOVED = "sha256:" + "b" * 64
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class StubClient:
    """An upstream client whose HEAD answers what a test says, and counts."""

    def __init__(self, answer: str | Exception = CACHED) -> None:
        self.answer = answer
        self.heads = 0
        self.gate: Event | None = None

    def head_manifest(self, repo, reference):
        self.heads += 1
        if self.gate is not None:
            self.gate.wait(5)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer, OCI_MANIFEST


def cached_manifest(created: str = "") -> Manifest:
    manifest = Manifest(CACHED, OCI_MANIFEST, b"{}", [URL])
    manifest.created = created or now_stamp()
    return manifest


def freshness(
    client: StubClient, tag_ttl: float = 60.0, entry_ttl: float | None = None
) -> TagFreshness:
    entry = RegistrySettings(name=HOST, tag_ttl=entry_ttl)
    settings = Settings(tag_ttl=tag_ttl, registries=[entry], pull_timeout=5.0)
    return TagFreshness(settings, client)  # type: ignore[arg-type]


def make_due(checker: TagFreshness) -> None:
    """Make the tag's last validation older than any TTL in these tests."""
    checker.validated[URL] = time.monotonic() - 10_000


# -- the policy, with a stub upstream -----------------------------------------


@pytest.mark.parametrize(
    ("top_level", "entry", "expected"),
    [(60.0, None, 60.0), (60.0, 5.0, 5.0), (60.0, 0.0, 0.0), (0.0, None, 0.0)],
)
def test_ttl_of_an_upstream_falls_back_to_the_top_level(top_level, entry, expected):
    checker = freshness(StubClient(), tag_ttl=top_level, entry_ttl=entry)

    assert checker.ttl(HOST) == expected


def test_top_level_ttl_applies_to_unconfigured_upstreams():
    checker = freshness(StubClient(), tag_ttl=42.0, entry_ttl=1.0)

    assert checker.ttl("other.example") == 42.0


def test_ttl_zero_never_asks_the_upstream():
    client = StubClient(MOVED)
    checker = freshness(client, tag_ttl=0.0)
    make_due(checker)

    assert checker.is_fresh(REPO, "1", cached_manifest())
    assert client.heads == 0


def test_tag_within_its_ttl_is_not_rechecked():
    client = StubClient(MOVED)
    checker = freshness(client)
    checker.mark_validated(URL)

    assert checker.is_fresh(REPO, "1", cached_manifest())
    assert client.heads == 0


def test_due_tag_with_the_same_digest_is_validated_again():
    client = StubClient(CACHED)
    checker = freshness(client)
    make_due(checker)

    first = checker.is_fresh(REPO, "1", cached_manifest())
    second = checker.is_fresh(REPO, "1", cached_manifest())

    assert (first, second) == (True, True)
    assert client.heads == 1


def test_due_tag_that_moved_upstream_is_not_fresh():
    client = StubClient(MOVED)
    checker = freshness(client)
    make_due(checker)

    assert not checker.is_fresh(REPO, "1", cached_manifest())
    assert client.heads == 1


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (UpstreamError(HOST, "rate limit reached (429)"), "rate limit reached (429)"),
        (UpstreamError(HOST, "unreachable: refused"), "unreachable: refused"),
        (ManifestUnknown(f"{URL} not found upstream"), "gone upstream"),
    ],
)
def test_failed_check_serves_the_cached_copy_with_a_warning(failure, reason, caplog):
    client = StubClient(failure)
    checker = freshness(client)
    make_due(checker)

    with caplog.at_level(logging.WARNING, logger="ociregistry.freshness"):
        is_fresh = checker.is_fresh(REPO, "1", cached_manifest())
        again = checker.is_fresh(REPO, "1", cached_manifest())

    assert (is_fresh, again) == (True, True)
    assert client.heads == 1  # the next check is due one TTL later
    assert f'serving stale manifest from cache: "{URL}"' in caplog.text
    assert reason in caplog.text


def test_record_created_long_ago_is_due_after_a_restart():
    client = StubClient(CACHED)
    checker = freshness(client)

    checker.is_fresh(REPO, "1", cached_manifest(created="2001-01-01T00:00:00"))

    assert client.heads == 1


def test_record_created_just_now_is_fresh_after_a_restart():
    client = StubClient(MOVED)
    checker = freshness(client)

    assert checker.is_fresh(REPO, "1", cached_manifest())
    assert client.heads == 0


def test_concurrent_requests_share_one_check():
    client = StubClient(CACHED)
    client.gate = Event()
    checker = freshness(client)
    make_due(checker)

    asks = [
        gevent.spawn(checker.is_fresh, REPO, "1", cached_manifest()) for _ in range(5)
    ]
    gevent.idle()  # every greenlet runs until it blocks: one on the gate
    client.gate.set()
    gevent.joinall(asks, timeout=5)

    assert [ask.value for ask in asks] == [True] * 5
    assert client.heads == 1


# -- end to end, through a real upstream --------------------------------------


def serve(oci_server, upstream, args=(), **entry):
    config = {"registries": [upstream.registry_config(**entry)]}
    return oci_server(*args, config=config, log_level="debug")


def get(server, path, method="GET"):
    return server.client().request(method, server.url + path)


def digest_of(server, path):
    response = get(server, path)
    assert response.status == 200, response.data
    return response.headers["Docker-Content-Digest"]


def test_tag_pushed_anew_is_picked_up_after_its_ttl_and_not_before(
    registry_upstream_factory, oci_server
):
    ttl = 3.0
    old, new = make_image("fresh-old"), make_image("fresh-new")
    upstream = registry_upstream_factory({"fresh/app:1": old})
    server = serve(oci_server, upstream, tagTtl=f"{ttl:g}s")
    path = f"/v2/{upstream.namespace}/fresh/app/manifests/1"
    first_pull = time.monotonic()
    assert digest_of(server, path) == old.digest

    Pusher(upstream.url).push_image("fresh/app", "1", new)
    before_ttl = digest_of(server, path)
    assert time.monotonic() - first_pull < ttl, "too slow to observe the TTL"
    wait_until(lambda: digest_of(server, path) == new.digest, 20, "new digest", 0.2)
    picked_up = time.monotonic()

    assert before_ttl == old.digest
    assert picked_up - first_pull >= ttl
    manifest_path = upstream.manifest_path("fresh/app", "1")
    assert upstream.count_requests(manifest_path, "HEAD") >= 1
    assert upstream.count_requests(manifest_path, "GET") == 2
    server.wait_for_log(f'tag moved upstream: "{upstream.namespace}/fresh/app:1"')


def test_unchanged_tag_is_revalidated_with_a_head_only(
    registry_upstream_factory, oci_server
):
    image = make_image("fresh-same")
    upstream = registry_upstream_factory({"fresh/same:1": image})
    server = serve(oci_server, upstream, tagTtl="1s")
    path = f"/v2/{upstream.namespace}/fresh/same/manifests/1"
    line = f'tag still current upstream: "{upstream.namespace}/fresh/same:1"'

    digests = []

    def revalidated() -> bool:
        digests.append(digest_of(server, path))
        return line in server.read_log()

    wait_until(revalidated, 20, "a re-validation", 0.2)

    assert set(digests) == {image.digest}
    manifest_path = upstream.manifest_path("fresh/same", "1")
    assert upstream.count_requests(manifest_path, "HEAD") >= 1
    assert upstream.count_requests(manifest_path, "GET") == 1


def test_stale_copy_is_served_with_a_warning_when_the_upstream_is_stopped(
    registry_upstream_factory, oci_server
):
    image = make_image("fresh-stale")
    upstream = registry_upstream_factory({"fresh/stale:1": image})
    server = serve(oci_server, upstream, tagTtl="1s")
    path = f"/v2/{upstream.namespace}/fresh/stale/manifests/1"
    assert digest_of(server, path) == image.digest
    upstream.stop()
    warning = f'serving stale manifest from cache: "{upstream.namespace}/fresh/stale:1"'

    answers = []

    def warned() -> bool:
        response = get(server, path)
        answers.append((response.status, response.data))
        return warning in server.read_log()

    wait_until(warned, 20, "the stale warning", 0.2)

    assert set(answers) == {(200, image.bytes)}
    line = next(line for line in server.read_log().splitlines() if warning in line)
    assert line.startswith("WARN")
    assert f"{warning}: upstream {upstream.namespace}: unreachable" in line


def test_rate_limited_upstream_gets_the_cached_copy_served(fake_upstream, oci_server):
    fake = fake_upstream()
    image = make_image("fresh-limited")
    fake.add("fresh/limited", "1", image)
    server = serve(oci_server, fake, tagTtl="1s")
    path = f"/v2/{fake.namespace}/fresh/limited/manifests/1"
    assert digest_of(server, path) == image.digest
    manifest_path = fake.manifest_path("fresh/limited", "1")
    fake.add_fault(manifest_path, Status(status=429, method="HEAD"))

    statuses = []

    def limited() -> bool:
        statuses.append(get(server, path).status)
        return "rate limit reached (429)" in server.read_log()

    wait_until(limited, 20, "the rate-limit warning", 0.2)

    assert set(statuses) == {200}
    assert fake.count(manifest_path, "HEAD", status=429) >= 1
    assert fake.count(manifest_path, "GET") == 1
    assert f'serving stale manifest from cache: "{fake.namespace}/fresh/limited:1"' in (
        server.read_log()
    )


def test_always_pull_latest_still_refetches_latest_despite_a_ttl(
    fake_upstream, oci_server
):
    fake = fake_upstream()
    fake.add("fresh/latest", "latest", make_image("fresh-latest"))
    server = serve(oci_server, fake, args=["--always-pull-latest"], tagTtl="1h")
    path = f"/v2/{fake.namespace}/fresh/latest/manifests/latest"

    statuses = [get(server, path).status for _ in range(3)]

    assert statuses == [200, 200, 200]
    manifest_path = fake.manifest_path("fresh/latest", "latest")
    assert fake.count(manifest_path, "GET") == 3
    assert fake.count(manifest_path, "HEAD") == 0

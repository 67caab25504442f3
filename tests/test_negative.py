"""The negative cache: upstream 404s for tags are remembered for negativeTtl."""

from __future__ import annotations

import json

import pytest
from support.images import make_image
from support.processes import wait_until

from ociregistry import negative
from ociregistry.errors import ManifestUnknown
from ociregistry.negative import NegativeCache

URL = "127.0.0.9/some/app:typo"
DIGEST = "sha256:" + "c" * 64


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(negative, "monotonic", clock)
    return clock


# -- the cache itself ----------------------------------------------------------


def test_remembered_tag_is_refused_until_its_ttl_passes(clock):
    cache = NegativeCache(ttl=30.0)
    cache.remember(URL, "typo")

    with pytest.raises(ManifestUnknown, match="not found upstream"):
        cache.check(URL)
    clock.now += 30.0
    cache.check(URL)

    assert len(cache) == 0


def test_digests_are_not_remembered(clock):
    cache = NegativeCache(ttl=30.0)

    cache.remember(f"127.0.0.9/some/app@{DIGEST}", DIGEST)

    assert len(cache) == 0


def test_ttl_zero_turns_the_cache_off(clock):
    cache = NegativeCache(ttl=0.0)

    cache.remember(URL, "typo")

    cache.check(URL)
    assert len(cache) == 0


def test_forgotten_tag_is_asked_again(clock):
    cache = NegativeCache(ttl=30.0)
    cache.remember(URL, "typo")

    cache.forget(URL)

    cache.check(URL)


def test_memory_is_bounded_expired_entries_first(clock):
    cache = NegativeCache(ttl=30.0, max_entries=3)
    cache.remember("h/a:old", "old")
    clock.now += 20.0
    cache.remember("h/a:1", "1")
    cache.remember("h/a:2", "2")
    clock.now += 15.0  # h/a:old has expired, the others have not

    cache.remember("h/a:3", "3")
    cache.remember("h/a:4", "4")

    assert len(cache) == 3
    cache.check("h/a:1")  # the oldest live entry made room for h/a:4
    for url in ("h/a:2", "h/a:3", "h/a:4"):
        with pytest.raises(ManifestUnknown):
            cache.check(url)


# -- end to end, through a real upstream --------------------------------------


def serve(oci_server, upstream, **config):
    config = {"registries": [upstream.registry_config()], **config}
    return oci_server(config=config)


def get(server, path):
    return server.client().request("GET", server.url + path)


def test_repeated_requests_for_a_missing_tag_reach_the_upstream_once(
    registry_upstream, oci_server
):
    server = serve(oci_server, registry_upstream)
    path = f"/v2/{registry_upstream.namespace}/single/oci/manifests/no-such-tag"

    answers = [get(server, path) for _ in range(5)]

    assert [answer.status for answer in answers] == [404] * 5
    codes = {json.loads(answer.data)["errors"][0]["code"] for answer in answers}
    assert codes == {"MANIFEST_UNKNOWN"}
    upstream_path = registry_upstream.manifest_path("single/oci", "no-such-tag")
    assert registry_upstream.count_requests(upstream_path) == 1
    server.wait_for_log("answering from negative cache")


def test_missing_tag_is_asked_again_after_the_negative_ttl(
    registry_upstream_factory, oci_server
):
    upstream = registry_upstream_factory({"neg/app:1": make_image("neg-app")})
    server = serve(oci_server, upstream, negativeTtl="1s")
    path = f"/v2/{upstream.namespace}/neg/app/manifests/2"
    upstream_path = upstream.manifest_path("neg/app", "2")
    assert get(server, path).status == 404

    statuses = []

    def asked_again() -> bool:
        statuses.append(get(server, path).status)
        return upstream.count_requests(upstream_path) >= 2

    wait_until(asked_again, 20, "a second upstream request", 0.2)

    assert upstream.count_requests(upstream_path) == 2
    assert statuses == [404] * len(statuses)
    server.wait_for_log("answering from negative cache")


def test_missing_digest_is_always_asked_upstream(registry_upstream, oci_server):
    server = serve(oci_server, registry_upstream)
    digest = "sha256:" + "d" * 64
    path = f"/v2/{registry_upstream.namespace}/single/oci/manifests/{digest}"

    statuses = [get(server, path).status for _ in range(3)]

    assert statuses == [404] * 3
    upstream_path = registry_upstream.manifest_path("single/oci", digest)
    assert registry_upstream.count_requests(upstream_path) == 3


def test_negative_ttl_zero_asks_the_upstream_every_time(registry_upstream, oci_server):
    server = serve(oci_server, registry_upstream, negativeTtl=0)
    path = f"/v2/{registry_upstream.namespace}/single/oci/manifests/never-cached"

    statuses = [get(server, path).status for _ in range(3)]

    assert statuses == [404] * 3
    upstream_path = registry_upstream.manifest_path("single/oci", "never-cached")
    assert registry_upstream.count_requests(upstream_path) == 3


def test_every_upstream_404_is_answered_404(registry_upstream, oci_server):
    server = serve(oci_server, registry_upstream, negativeTtl=0)
    ns = registry_upstream.namespace

    statuses = [
        get(server, f"/v2/{ns}/single/oci/manifests/gone-{index}").status
        for index in range(10)
    ]

    assert statuses == [404] * 10

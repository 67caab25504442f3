"""Per-upstream concurrency limits: `registries[].maxConcurrent`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from support.images import make_image
from support.processes import wait_until

TAGS = ("t1", "t2", "t3", "t4")
PULLING = "pulling manifest from upstream"


def is_manifest(path: str) -> bool:
    return "/manifests/" in path


def start(fake_upstream, oci_server, **entry):
    """Serve four tags from a fake whose manifest requests wait at a gate."""
    fake = fake_upstream()
    for tag in TAGS:
        fake.add("limit/app", tag, make_image(f"limit-{tag}", layer_sizes=(64,)))
    gate = fake.gate(is_manifest)
    server = oci_server(config={"registries": [fake.registry_config(**entry)]})
    return fake, gate, server


def get_all(server, fake, pool):
    return [
        pool.submit(
            server.client().request,
            "GET",
            f"{server.url}/v2/{fake.namespace}/limit/app/manifests/{tag}",
        )
        for tag in TAGS
    ]


def test_max_concurrent_holds_requests_beyond_the_limit(fake_upstream, oci_server):
    fake, gate, server = start(fake_upstream, oci_server, maxConcurrent=2)

    with ThreadPoolExecutor(len(TAGS)) as pool:
        answers = get_all(server, fake, pool)
        gate.wait_arrived(2)
        wait_until(lambda: server.read_log().count(PULLING) == len(TAGS), 10)
        with pytest.raises(TimeoutError):
            gate.wait_arrived(3, timeout=1.0)
        gate.release()
        statuses = [answer.result(timeout=30).status for answer in answers]

    assert statuses == [200] * len(TAGS)
    assert gate.arrived == len(TAGS)


def test_without_a_limit_every_request_reaches_the_upstream_at_once(
    fake_upstream, oci_server
):
    fake, gate, server = start(fake_upstream, oci_server)

    with ThreadPoolExecutor(len(TAGS)) as pool:
        answers = get_all(server, fake, pool)
        gate.wait_arrived(len(TAGS))
        gate.release()
        statuses = [answer.result(timeout=30).status for answer in answers]

    assert statuses == [200] * len(TAGS)

"""The health and metrics ports (`--health`, `--metrics`), end to end."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families
from support.fake_upstream import Stall
from support.images import make_image
from support.processes import REPO_ROOT, OciServer, free_port, wait_until

from ociregistry.health import HealthApp
from ociregistry.wsgi import endpoint_of

PRELOADED = make_image("health-preload", layer_sizes=(1024,))

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def side_get(port: int, path: str) -> urllib3.BaseHTTPResponse:
    pool = urllib3.PoolManager(retries=False, timeout=5)
    return pool.request("GET", f"http://127.0.0.1:{port}{path}")


def health_status(port: int) -> int | None:
    """Return the status of GET /health, or None when nothing answers."""
    try:
        return side_get(port, "/health").status
    except urllib3.exceptions.HTTPError:
        return None


def scrape(port: int) -> Samples:
    """Return every sample of GET /metrics by (name, sorted labels)."""
    response = side_get(port, "/metrics")
    assert response.status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.data.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Return one sample's value; 0 when it has not been recorded."""
    return samples.get((f"ociregistry_{name}", tuple(sorted(labels.items()))), 0.0)


# /health.


def test_health_is_503_while_starting_and_200_once_serving(
    fake_upstream, tmp_path, cache_root
):
    fake = fake_upstream()
    fake.add_image("app/x", "1", PRELOADED)
    stall = fake.add_fault(fake.manifest_path("app/x", "1"), Stall(times=1))
    images = tmp_path / "images.txt"
    images.write_text(f"{fake.namespace}/app/x:1\n")
    health = free_port()
    server = OciServer(
        cache_root,
        tmp_path / "servers",
        ["--health", str(health), "--preload-images", str(images)],
        config={"registries": [fake.registry_config()]},
    )
    starting = threading.Thread(target=server.start, daemon=True)

    starting.start()
    try:
        stall.arrived.wait(15)
        during_start = health_status(health)
        stall.release.set()
        starting.join(20)
        after_start = health_status(health)
    finally:
        stall.release.set()
        starting.join(20)
        server.stop()

    assert stall.arrived.is_set()
    assert during_start == 503
    assert after_start == 200


def test_health_answers_only_on_its_path(oci_server):
    health = free_port()
    oci_server("--health", str(health))

    assert side_get(health, "/health").status == 200
    assert side_get(health, "/v2/").status == 404


def test_health_app_follows_readiness():
    ready = [False]
    app = HealthApp(lambda: ready[0])
    statuses = []

    def start_response(status, headers):
        statuses.append(status)

    app({"PATH_INFO": "/health", "REQUEST_METHOD": "GET"}, start_response)
    ready[0] = True
    app({"PATH_INFO": "/health", "REQUEST_METHOD": "GET"}, start_response)

    assert statuses == ["503 Service Unavailable", "200 OK"]


# /metrics.


def test_metrics_change_as_pulls_happen(registry_upstream, oci_server, cache_root):
    port = free_port()
    config = {"registries": [registry_upstream.registry_config()]}
    server = oci_server("--metrics", str(port), config=config)
    ns = registry_upstream.namespace
    image = registry_upstream.content["single/oci:1"]
    client = server.client()

    def get(path: str) -> urllib3.BaseHTTPResponse:
        return client.request("GET", f"{server.url}/v2/{path}?ns={ns}")

    before = scrape(port)
    assert get("single/oci/manifests/1").status == 200
    after_upstream = scrape(port)
    assert get("single/oci/manifests/1").status == 200
    assert get(f"single/oci/blobs/{image.layers[1].digest}").status == 200
    assert get("single/oci/manifests/missing-for-metrics").status == 404
    after = scrape(port)

    assert value(before, "manifest_pulls_total") == 0
    assert value(after_upstream, "upstream_pulls_by_ns", ns=ns) >= 1
    assert value(after_upstream, "cached_pulls_by_ns_total", ns=ns) == 0
    assert value(after, "manifest_pulls_total") == 3
    assert value(after, "blob_pulls_total") == 1
    assert value(after, "cached_pulls_by_ns_total", ns=ns) >= 1
    assert value(after, "v2_api_endpoint_hits_total", endpoint="manifests") == 3
    assert value(after, "v2_api_endpoint_hits_total", endpoint="blobs") == 1
    assert value(after, "api_errors_total", status="404") == 1
    assert value(after, "request_duration_seconds_count", endpoint="manifests") == 3
    assert ("ociregistry_upstream_pulls_in_flight", ()) in after

    layers = sum(blob.size for blob in image.blobs)

    def disk_counted() -> bool:
        samples = scrape(port)
        return (
            value(samples, "cached_manifest_count") == 1
            and value(samples, "cached_blob_count") == len(image.blobs)
            and value(samples, "blob_bytes_on_disk_total") == layers
            and value(samples, "manifest_bytes_on_disk_total") == image.size
            # Two manifests (one missing) and every blob, each pulled once.
            and value(samples, "upstream_pulls_by_ns", ns=ns) == 2 + len(image.blobs)
        )

    wait_until(disk_counted, 15.0, "on-disk figures", interval=0.5)


def test_metrics_answer_only_on_their_path(oci_server):
    port = free_port()
    oci_server("--metrics", str(port))

    assert side_get(port, "/metrics").status == 200
    assert side_get(port, "/").status == 404


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v2/", "v2"),
        ("/v2/_catalog", "catalog"),
        ("/v2/registry.k8s.io/pause/manifests/3.9", "manifests"),
        ("/v2/library/busybox/blobs/sha256:00", "blobs"),
        ("/v2/a/b/tags/list", "tags"),
        ("/v2/a/referrers/sha256:00", "referrers"),
        ("/cmd/image/list", "cmd"),
        ("/favicon.ico", "other"),
    ],
)
def test_latency_endpoint_of_a_path(path, endpoint):
    assert endpoint_of(path) == endpoint


@pytest.mark.parametrize("flag", ["--health", "--metrics"])
def test_side_port_in_use_is_one_line(tmp_path, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        done = subprocess.run(
            [
                sys.executable, "-m", "ociregistry", "--image-path", str(tmp_path),
                "serve", "--host", "127.0.0.1", "--port", str(free_port()),
                flag, str(port),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_ROOT,
        )  # fmt: skip

    assert done.returncode == 1
    assert done.stderr == (
        f"ociregistry: cannot listen on 127.0.0.1:{port} for {flag}: "
        "address already in use\n"
    )

"""Several server processes on one cache root: work is claimed across them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import urllib3
from support.images import make_image

LAYER = 512 * 1024


def test_two_servers_on_one_root_pull_each_item_once(oci_server, fake_upstream):
    fake = fake_upstream()
    image = make_image("shared-root", layer_sizes=(LAYER, LAYER))
    fake.add_image("app/z", "1", image)
    gate = fake.gate()
    config = {"registries": [fake.registry_config()]}
    servers = [oci_server(config=config), oci_server(config=config)]
    client = urllib3.PoolManager(retries=False, timeout=30)
    paths = ["manifests/1"] + [f"blobs/{b.digest}" for b in image.blobs]

    def pull(server):
        base = f"{server.url}/v2/{fake.host_port}/app/z"
        return [client.request("GET", f"{base}/{path}").data for path in paths]

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(pull, servers[n % 2]) for n in range(4)]
        gate.wait_arrived(1)
        gate.release()
        results = [future.result(timeout=60) for future in futures]

    expected = [image.bytes] + [blob.data for blob in image.blobs]
    assert all(result == expected for result in results)
    hits = fake.hits()
    assert hits[("GET", "/v2/app/z/manifests/1")] == 1
    for blob in image.blobs:
        assert hits[("GET", f"/v2/app/z/blobs/{blob.digest}")] == 1


def test_manifest_cached_by_one_server_is_served_by_the_other(
    oci_server, fake_upstream
):
    fake = fake_upstream()
    image = make_image("shared-index")
    fake.add_image("app/w", "1", image)
    config = {"registries": [fake.registry_config()]}
    first, second = oci_server(config=config), oci_server(config=config)
    client = urllib3.PoolManager(retries=False, timeout=30)
    path = f"/v2/{fake.host_port}/app/w/manifests/1"

    assert client.request("GET", first.url + path).data == image.bytes
    fake.close()
    served = client.request("GET", second.url + path)

    assert served.status == 200 and served.data == image.bytes


def test_upstream_named_by_header_or_default_namespace(oci_server, fake_upstream):
    fake = fake_upstream()
    image = make_image("naming")
    fake.add_image("app/v", "1", image)
    config = {"registries": [fake.registry_config()]}
    plain = oci_server(config=config)
    defaulted = oci_server("--default-ns", fake.host_port, config=config)
    client = urllib3.PoolManager(retries=False, timeout=30)

    by_header = client.request(
        "GET",
        f"{plain.url}/v2/app/v/manifests/1",
        headers={"X-Registry": fake.host_port},
    )
    by_default = client.request("GET", f"{defaulted.url}/v2/app/v/manifests/1")

    assert by_header.status == 200 and by_header.data == image.bytes
    assert "OCI-Namespace" not in by_header.headers
    assert by_default.status == 200 and by_default.data == image.bytes

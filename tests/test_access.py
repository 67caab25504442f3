"""Access control: the upstream allow-list and the admin API's restrictions."""

from __future__ import annotations

import time

import pytest
import urllib3
from support.images import make_image

from ociregistry.access import AdminAccess, peer_address
from ociregistry.config import AdminApiSettings
from ociregistry.errors import Denied, Unauthorized

IMAGE = make_image("access", layer_sizes=(1024,))
ADMIN_TOKEN = "admin-token-6b1f0c"
OUTSIDER = "127.0.0.5"  # a loopback source address outside 127.0.0.1/32


def client_from(source: str = "127.0.0.1") -> urllib3.PoolManager:
    """Return a pool whose connections come from `source`."""
    return urllib3.PoolManager(retries=False, timeout=10, source_address=(source, 0))


def admin_get(server, path="/cmd/manifest/list", source="127.0.0.1", headers=None):
    return client_from(source).request("GET", server.url + path, headers=headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# The upstream allow-list.


@pytest.fixture
def allowed_and_not(fake_upstream):
    """Two fakes holding IMAGE: one on 127.0.0.1 (allowed), one on 127.0.0.6."""
    allowed = fake_upstream(address="127.0.0.1")
    outside = fake_upstream(address="127.0.0.6")
    for fake in (allowed, outside):
        fake.add_image("app/x", "1", IMAGE)
    return allowed, outside


def allow_list_server(oci_server, allowed, outside, patterns):
    registries = [f.registry_config() for f in (allowed, outside)]
    config = {"registries": registries, "allowedUpstreams": patterns}
    return oci_server(config=config)


def test_allow_list_refuses_link_local_metadata_address(oci_server, allowed_and_not):
    allowed, outside = allowed_and_not
    server = allow_list_server(oci_server, allowed, outside, ["127.0.0.1:*"])

    started = time.monotonic()
    response = server.client().request(
        "GET", server.url + "/v2/latest/meta-data/manifests/1?ns=169.254.169.254"
    )

    assert response.status == 403
    error = response.json()["errors"][0]
    assert error["code"] == "DENIED"
    assert "169.254.169.254" in error["message"]
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "route",
    [
        pytest.param(lambda ns: (f"/v2/app/x/manifests/1?ns={ns}", {}), id="ns"),
        pytest.param(lambda ns: (f"/v2/{ns}/app/x/manifests/1", {}), id="in-path"),
        pytest.param(
            lambda ns: ("/v2/app/x/manifests/1", {"X-Registry": ns}), id="header"
        ),
        pytest.param(
            lambda ns: (f"/v2/app/x/blobs/{IMAGE.layers[0].digest}?ns={ns}", {}),
            id="blob",
        ),
    ],
)
def test_allow_list_refuses_other_upstreams_without_connecting(
    oci_server, allowed_and_not, route
):
    allowed, outside = allowed_and_not
    server = allow_list_server(oci_server, allowed, outside, ["127.0.0.1:*"])
    path, headers = route(outside.namespace)

    response = server.client().request("GET", server.url + path, headers=headers)

    assert response.status == 403
    assert response.json()["errors"][0]["code"] == "DENIED"
    assert outside.requests() == []


def test_allow_list_admits_matching_upstreams(oci_server, allowed_and_not):
    allowed, outside = allowed_and_not
    patterns = ["registry.k8s.io", "*.example.com", allowed.namespace]
    server = allow_list_server(oci_server, allowed, outside, patterns)

    response = server.client().request(
        "GET", f"{server.url}/v2/app/x/manifests/1?ns={allowed.namespace}"
    )

    assert response.status == 200
    assert response.data == IMAGE.bytes
    assert allowed.count("/v2/app/x/manifests/1") == 1


# The admin API.


def test_admin_api_is_open_by_default_and_the_banner_says_so(oci_server):
    server = oci_server()

    response = admin_get(server, source=OUTSIDER)

    assert response.status == 200
    assert "Admin API: open to every client (see adminApi)" in (
        server.read_stderr().splitlines()
    )


def test_admin_api_refuses_a_source_outside_the_allowed_networks(oci_server):
    config = {"adminApi": {"allowedNetworks": ["127.0.0.1/32"]}}
    server = oci_server(config=config)

    refused = admin_get(server, source=OUTSIDER)
    spoofed = admin_get(
        server, source=OUTSIDER, headers={"X-Forwarded-For": "127.0.0.1"}
    )
    stop = admin_get(server, "/cmd/stop", source=OUTSIDER)
    admitted = admin_get(server, source="127.0.0.1")

    assert refused.status == 403
    assert OUTSIDER in refused.data.decode()
    assert spoofed.status == 403
    assert stop.status == 403
    assert server.is_running()
    assert admitted.status == 200
    assert "Admin API: allowed from 127.0.0.1/32" in server.read_stderr()


def test_admin_api_refuses_a_request_without_the_token(oci_server):
    server = oci_server(config={"adminApi": {"token": ADMIN_TOKEN}})

    missing = admin_get(server)
    wrong = admin_get(server, headers=bearer("not-" + ADMIN_TOKEN))
    basic = admin_get(server, headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    prune = client_from().request(
        "DELETE", server.url + "/cmd/prune?type=pattern&expr=.&dryRun=true"
    )
    stop = admin_get(server, "/cmd/stop")
    admitted = admin_get(server, headers=bearer(ADMIN_TOKEN))

    assert [r.status for r in (missing, wrong, basic, prune, stop)] == [401] * 5
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="ociregistry"'
    assert server.is_running()
    assert admitted.status == 200
    assert ADMIN_TOKEN not in server.read_log()


def test_admin_api_with_networks_and_token_needs_both(oci_server):
    admin = {"allowedNetworks": ["127.0.0.1/32"], "token": ADMIN_TOKEN}
    server = oci_server(config={"adminApi": admin})

    outside_with_token = admin_get(server, source=OUTSIDER, headers=bearer(ADMIN_TOKEN))
    inside_without = admin_get(server)
    inside_with = admin_get(server, headers=bearer(ADMIN_TOKEN))

    assert outside_with_token.status == 403
    assert inside_without.status == 401
    assert inside_with.status == 200


def test_admin_restriction_leaves_the_registry_api_open(oci_server):
    admin = {"allowedNetworks": ["127.0.0.1/32"], "token": ADMIN_TOKEN}
    server = oci_server(config={"adminApi": admin})

    response = client_from(OUTSIDER).request("GET", server.url + "/v2/")

    assert response.status == 200


# AdminAccess itself.


@pytest.mark.parametrize(
    ("remote", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("fe80::1%eth0", "fe80::1"),
        ("not an address", None),
        ("", None),
    ],
)
def test_peer_address_reads_the_socket_peer(remote, expected):
    address = peer_address({"REMOTE_ADDR": remote})

    assert (None if address is None else str(address)) == expected


def test_ipv4_mapped_client_matches_an_ipv4_network():
    access = AdminAccess(AdminApiSettings(allowed_networks=["10.0.0.0/8"]))

    access.check({"REMOTE_ADDR": "::ffff:10.1.2.3"})

    with pytest.raises(Denied):
        access.check({"REMOTE_ADDR": "::ffff:192.168.1.1"})


def test_token_check_wants_the_bearer_scheme_and_exact_token():
    access = AdminAccess(AdminApiSettings(token=ADMIN_TOKEN))

    access.check({"HTTP_AUTHORIZATION": f"bearer {ADMIN_TOKEN}"})

    for header in ("", ADMIN_TOKEN, f"Bearer {ADMIN_TOKEN}x", "Bearer "):
        with pytest.raises(Unauthorized):
            access.check({"HTTP_AUTHORIZATION": header})


def test_open_access_admits_everyone():
    access = AdminAccess(AdminApiSettings())

    access.check({"REMOTE_ADDR": "203.0.113.9"})

    assert access.is_open

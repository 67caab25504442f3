"""TLS: serving https and mTLS, and reaching https upstreams (SPEC §2).

Every upstream here is a real docker-registry serving https with a test CA
made by trustme; one also demands client certificates (`clientcas`).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import urllib3
from support.images import make_image
from support.push import Pusher
from support.upstream import RegistryUpstream, TlsFiles

IMAGE = make_image("tls-upstream", layer_sizes=(4096,))
REPO = "tls/app"
QUICK = 10.0  # seconds: a verification failure must answer well within this


@dataclass(frozen=True)
class Pki:
    """PEM files: a server CA and its 127.0.0.1 certificate, a client CA
    and its client certificate."""

    ca: str
    server_cert: str
    server_key: str
    client_ca: str
    client_cert: str
    client_key: str


def write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> tuple[str, str]:
    """Write a leaf certificate chain and key; return their paths."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return str(cert), str(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(directory / "client-ca.pem"))
    server = write_leaf(directory, "server", server_ca.issue_cert("127.0.0.1"))
    client = write_leaf(directory, "client", client_ca.issue_cert("puller.test"))
    return Pki(
        str(directory / "ca.pem"),
        *server,
        str(directory / "client-ca.pem"),
        *client,
    )


def tls_upstream(factory, pki: Pki, demand_client_cert: bool = False):
    """Start an https docker-registry holding IMAGE as tls/app:1."""
    tls = TlsFiles(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)
    if demand_client_cert:
        tls.client_cas = [pki.client_ca]
        tls.client_cert, tls.client_key = pki.client_cert, pki.client_key
    upstream: RegistryUpstream = factory(port=0, tls=tls)
    Pusher(upstream.url, pool=upstream.client()).push_image(REPO, "1", IMAGE)
    return upstream


def entry(upstream: RegistryUpstream, **tls: object) -> dict[str, object]:
    """Return a `registries` entry for an upstream with these tls keys."""
    return {"name": upstream.namespace, "scheme": "https", "tls": tls}


def get(server, path: str):
    return server.client().request("GET", server.url + path)


def pull_manifest(server, upstream: RegistryUpstream):
    return get(server, f"/v2/{upstream.namespace}/{REPO}/manifests/1")


def pull_layer(server, upstream: RegistryUpstream):
    digest = IMAGE.layers[0].digest
    return get(server, f"/v2/{upstream.namespace}/{REPO}/blobs/{digest}")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Upstream https.


def test_upstream_verified_with_its_ca_serves_the_image(
    registry_upstream_factory, oci_server, pki
):
    upstream = tls_upstream(registry_upstream_factory, pki)
    server = oci_server(config={"registries": [entry(upstream, ca=pki.ca)]})

    manifest = pull_manifest(server, upstream)
    layer = pull_layer(server, upstream)

    assert manifest.status == 200
    assert manifest.data == IMAGE.bytes
    assert layer.status == 200
    assert sha256(layer.data) == IMAGE.layers[0].digest


@pytest.mark.parametrize(
    "registries",
    [
        pytest.param(lambda u: [entry(u)], id="entry-without-ca"),
        pytest.param(
            lambda u: [{"name": "*", "tls": {"insecureSkipVerify": False}}],
            id="star-entry-turns-verification-on",
        ),
    ],
)
def test_upstream_with_untrusted_certificate_is_502_naming_it_quickly(
    registry_upstream_factory, oci_server, pki, registries
):
    upstream = tls_upstream(registry_upstream_factory, pki)
    server = oci_server(config={"registries": registries(upstream)})

    started = time.monotonic()
    response = pull_manifest(server, upstream)
    elapsed = time.monotonic() - started

    assert response.status == 502
    message = response.json()["errors"][0]["message"]
    assert upstream.namespace in message
    assert "TLS failure: certificate verify failed" in message
    assert elapsed < QUICK
    assert upstream.count_requests(f"/v2/{REPO}/manifests/1") == 0


def test_upstream_with_insecure_skip_verify_serves_the_image(
    registry_upstream_factory, oci_server, pki
):
    upstream = tls_upstream(registry_upstream_factory, pki)
    config = {"registries": [entry(upstream, insecureSkipVerify=True)]}
    server = oci_server(config=config)

    response = pull_manifest(server, upstream)

    assert response.status == 200
    assert response.data == IMAGE.bytes


def test_unconfigured_upstream_is_reached_without_verification(
    registry_upstream_factory, oci_server, pki
):
    upstream = tls_upstream(registry_upstream_factory, pki)
    server = oci_server()

    response = pull_manifest(server, upstream)

    assert response.status == 200
    assert response.data == IMAGE.bytes


def test_upstream_demanding_a_client_certificate_accepts_ours(
    registry_upstream_factory, oci_server, pki
):
    upstream = tls_upstream(registry_upstream_factory, pki, demand_client_cert=True)
    tls = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key}
    server = oci_server(config={"registries": [entry(upstream, **tls)]})

    manifest = pull_manifest(server, upstream)
    layer = pull_layer(server, upstream)

    assert manifest.status == 200
    assert manifest.data == IMAGE.bytes
    assert layer.status == 200
    assert sha256(layer.data) == IMAGE.layers[0].digest


def test_upstream_demanding_a_client_certificate_without_one_is_502(
    registry_upstream_factory, oci_server, pki
):
    upstream = tls_upstream(registry_upstream_factory, pki, demand_client_cert=True)
    server = oci_server(config={"registries": [entry(upstream, ca=pki.ca)]})

    started = time.monotonic()
    response = pull_manifest(server, upstream)

    assert response.status == 502
    message = response.json()["errors"][0]["message"]
    assert upstream.namespace in message
    assert "TLS failure" in message
    assert time.monotonic() - started < QUICK


# Serving https.


def https_server(oci_server, pki: Pki, client_auth: str = "none", **options):
    """Start our server on https with the server certificate of `pki`."""
    tls = {"cert": pki.server_cert, "key": pki.server_key}
    if client_auth == "verify":
        tls.update(ca=pki.client_ca, clientAuth="verify")
        options.setdefault("client_cert", (pki.client_cert, pki.client_key))
    return oci_server(config={"serverTlsConfig": tls}, **options)


def verified_client(pki: Pki, cert: tuple[str, str] | None = None):
    """Return a pool that verifies our server against the test CA."""
    cert_file, key_file = cert or (None, None)
    return urllib3.PoolManager(
        retries=False,
        timeout=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=pki.ca,
        cert_file=cert_file,
        key_file=key_file,
    )


def tls12_handshake(server, pki: Pki, cert: tuple[str, str] | None = None) -> None:
    """Complete a TLS 1.2 handshake with our server, or raise ssl.SSLError.

    With TLS 1.2 a refused client certificate fails the handshake itself
    (TLS 1.3 reports it on the first read).
    """
    context = ssl.create_default_context(cafile=pki.ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(*cert)
    with socket.create_connection((server.host, server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server.host):
            pass


def test_serves_https_with_the_configured_certificate(oci_server, pki):
    server = https_server(oci_server, pki)

    response = verified_client(pki).request("GET", server.url + "/v2/")

    assert server.url.startswith("https://")
    assert response.status == 200
    assert f"Tls: server cert {pki.server_cert}, client auth none" in (
        server.read_stderr().splitlines()
    )


def test_mtls_accepts_a_client_with_a_trusted_certificate(oci_server, pki):
    server = https_server(oci_server, pki, client_auth="verify")
    client = verified_client(pki, (pki.client_cert, pki.client_key))

    response = client.request("GET", server.url + "/v2/")

    assert response.status == 200
    banner = server.read_stderr().splitlines()
    assert (
        f"Tls: server cert {pki.server_cert}, client auth verify "
        f"against {pki.client_ca}"
    ) in banner


def test_mtls_refuses_a_client_without_certificate_at_the_handshake(oci_server, pki):
    server = https_server(oci_server, pki, client_auth="verify")

    with pytest.raises(ssl.SSLError):
        tls12_handshake(server, pki)
    with pytest.raises(urllib3.exceptions.HTTPError):
        verified_client(pki).request("GET", server.url + "/v2/?no-cert")

    log = server.wait_for_log('tls handshake failed: "127.0.0.1"')
    assert "no-cert" not in log
    assert "Traceback" not in log
    tls12_handshake(server, pki, (pki.client_cert, pki.client_key))


def test_mtls_refuses_a_certificate_from_another_ca(oci_server, pki):
    server = https_server(oci_server, pki, client_auth="verify")

    with pytest.raises(ssl.SSLError):
        tls12_handshake(server, pki, (pki.server_cert, pki.server_key))

    server.wait_for_log('tls handshake failed: "127.0.0.1"')


def test_plain_http_on_the_https_port_gets_no_answer(oci_server, pki):
    server = https_server(oci_server, pki)

    with socket.create_connection((server.host, server.port), timeout=10) as raw:
        raw.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(1024)
        except ConnectionResetError:
            answer = b""

    assert not answer.startswith(b"HTTP/")
    server.wait_for_log('tls handshake failed: "127.0.0.1"')
    assert verified_client(pki).request("GET", server.url + "/v2/").status == 200

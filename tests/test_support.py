"""Self-tests of the test support: images, pushes, upstreams, the fake, servers."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3
from support.fake_upstream import (
    Disconnect,
    DropAfter,
    FakeUpstream,
    InvalidJson,
    Stall,
    Status,
    Trickle,
    WrongBytes,
    WrongContentType,
)
from support.images import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    ImageIndex,
    make_artifact,
    make_image,
    make_index,
    sha256_digest,
)
from support.processes import OciServer, ProcessStartError
from support.upstream import (
    ProxySettings,
    RegistryUpstream,
    TlsFiles,
    allocate_loopback_address,
    parse_access_log,
    release_loopback_address,
)

ACCEPT = ", ".join(
    [
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_LIST,
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
UpstreamFactory = Callable[..., RegistryUpstream]
FakeFactory = Callable[..., FakeUpstream]


@pytest.fixture
def http() -> urllib3.PoolManager:
    """A client that neither retries nor follows redirects."""
    return urllib3.PoolManager(retries=False, timeout=10.0, maxsize=10)


def get_manifest(
    http: urllib3.PoolManager, base_url: str, repo: str, reference: str
) -> urllib3.BaseHTTPResponse:
    """GET a manifest, accepting every manifest type."""
    url = f"{base_url}/v2/{repo}/manifests/{reference}"
    return http.request("GET", url, headers={"Accept": ACCEPT})


# images.py


def test_images_are_deterministic() -> None:
    first = make_index("seed", oci=False)

    second = make_index("seed", oci=False)

    assert first.bytes == second.bytes
    assert first.digest == sha256_digest(first.bytes)
    assert [image.manifest_bytes for image in first.images] == [
        image.manifest_bytes for image in second.images
    ]


def test_image_config_names_platform_and_layer_diff_ids() -> None:
    image = make_image("diff", layer_sizes=(10, 3000), arch="arm64")

    config = json.loads(image.config.data)

    assert (config["os"], config["architecture"]) == ("linux", "arm64")
    for layer, diff_id in zip(image.layers, config["rootfs"]["diff_ids"], strict=True):
        tar = gzip.decompress(layer.data)
        assert sha256_digest(tar) == diff_id
        assert layer.digest == sha256_digest(layer.data)
    sizes = [
        member.size for member in tarfile.open(fileobj=io.BytesIO(tar)).getmembers()
    ]
    assert sizes == [3000]


def test_index_lists_each_platform_image() -> None:
    index = make_index(
        "platforms", platforms=[("linux", "amd64"), ("linux", "arm", "v7")]
    )

    entries = json.loads(index.bytes)["manifests"]

    assert [entry["digest"] for entry in entries] == [
        image.manifest_digest for image in index.images
    ]
    assert entries[1]["platform"] == {
        "os": "linux",
        "architecture": "arm",
        "variant": "v7",
    }
    assert index.image_for("linux", "arm").platform == ("linux", "arm", "v7")


def test_artifact_refers_to_its_subject() -> None:
    subject = make_image("subject")

    artifact = make_artifact("sbom", subject)

    manifest = artifact.manifest()
    assert manifest["subject"]["digest"] == subject.manifest_digest
    assert manifest["artifactType"] == artifact.artifact_type


# push.py and upstream.py against the session's docker-registry


def test_pushed_index_comes_back_by_tag_with_identical_bytes(
    registry_upstream: RegistryUpstream, http: urllib3.PoolManager
) -> None:
    index = registry_upstream.content["multi/arch:1.0"]
    assert isinstance(index, ImageIndex)

    response = get_manifest(http, registry_upstream.url, "multi/arch", "1.0")

    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.headers["Docker-Content-Digest"] == index.digest
    assert response.data == index.bytes


def test_session_upstream_serves_all_standard_content(
    registry_upstream: RegistryUpstream, http: urllib3.PoolManager
) -> None:
    for name, item in registry_upstream.content.items():
        repo, tag = name.rsplit(":", 1)

        response = get_manifest(http, registry_upstream.url, repo, tag)

        assert response.status == 200, name
        assert response.data == item.bytes, name
        assert response.headers["Content-Type"] == item.media_type, name


def test_upstream_log_counts_blob_requests(
    registry_upstream: RegistryUpstream, http: urllib3.PoolManager
) -> None:
    image = registry_upstream.content["a/b/c/d/e:1"]
    assert isinstance(image, Image)
    path = registry_upstream.blob_path("a/b/c/d/e", image.layers[0].digest)
    before = registry_upstream.count_requests(path)

    for _ in range(3):
        assert http.request("GET", registry_upstream.url + path).status == 200

    assert registry_upstream.count_requests(path) == before + 3
    assert registry_upstream.count_requests(path, method="HEAD") >= 1  # the push


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_skopeo_copies_multi_arch_index_from_upstream(
    registry_upstream: RegistryUpstream, tmp_path: Path
) -> None:
    index = registry_upstream.content["multi/arch:1.0"]
    source = f"docker://{registry_upstream.namespace}/multi/arch:1.0"

    subprocess.run(
        [
            "skopeo",
            "copy",
            "--all",
            "--src-tls-verify=false",
            source,
            f"oci:{tmp_path}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )

    layout = json.loads((tmp_path / "index.json").read_text())
    assert layout["manifests"][0]["digest"] == index.digest
    for blob in index.blobs:
        assert (tmp_path / "blobs/sha256" / blob.hex).read_bytes() == blob.data


def test_parse_access_log_ignores_other_lines() -> None:
    text = (
        'time="…" level=info msg="response completed" http.request.uri=/v2/\n'
        '127.0.0.1 - - [03/Dec/2026:14:34:38 +0000] "HEAD /v2/x/blobs/sha256:ab?a=b'
        ' HTTP/1.1" 404 0 "" "curl/7.88.1"\n'
    )

    lines = parse_access_log(text)

    assert [(line.method, line.path, line.query, line.status) for line in lines] == [
        ("HEAD", "/v2/x/blobs/sha256:ab", "a=b", 404)
    ]


def test_loopback_addresses_are_distinct_until_released() -> None:
    first = allocate_loopback_address(port=81)
    second = allocate_loopback_address(port=81)

    release_loopback_address(first, 81)
    release_loopback_address(second, 81)

    assert first != second
    assert first.startswith("127.0.0.") and first != "127.0.0.1"


def test_htpasswd_upstream_requires_credentials(
    registry_upstream_factory: UpstreamFactory, http: urllib3.PoolManager
) -> None:
    pytest.importorskip("bcrypt")
    image = make_image("auth")
    upstream = registry_upstream_factory(
        {"private/app:1": image}, port=0, htpasswd={"alice": "secret"}
    )
    headers = urllib3.make_headers(basic_auth="alice:secret")
    url = f"{upstream.url}/v2/private/app/manifests/1"

    anonymous = http.request("GET", url)
    authorised = http.request("GET", url, headers={**headers, "Accept": OCI_MANIFEST})

    assert anonymous.status == 401
    assert "Basic" in anonymous.headers["WWW-Authenticate"]
    assert authorised.data == image.manifest_bytes
    assert upstream.registry_config()["auth"] == {"user": "alice", "password": "secret"}


def test_tls_upstream_serves_over_https(
    registry_upstream_factory: UpstreamFactory, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    ca_path, cert_path, key_path = (tmp_path / name for name in ("ca", "crt", "key"))
    authority.cert_pem.write_to_path(str(ca_path))
    certificate.cert_chain_pems[0].write_to_path(str(cert_path))
    certificate.private_key_pem.write_to_path(str(key_path))
    tls = TlsFiles(cert=str(cert_path), key=str(key_path), ca=str(ca_path))
    image = make_image("tls")

    upstream = registry_upstream_factory({"secure/app:1": image}, port=0, tls=tls)
    client = upstream.client()

    assert upstream.url.startswith("https://127.0.0.1:")
    response = get_manifest(client, upstream.url, "secure/app", "1")
    assert response.data == image.manifest_bytes


def test_proxy_upstream_pulls_through_from_remote(
    registry_upstream: RegistryUpstream,
    registry_upstream_factory: UpstreamFactory,
    http: urllib3.PoolManager,
) -> None:
    image = registry_upstream.content["single/docker:1"]
    remote_path = registry_upstream.manifest_path("single/docker", "1")
    before = registry_upstream.count_requests(remote_path)
    proxy = registry_upstream_factory(
        port=0, proxy=ProxySettings(remote_url=registry_upstream.url)
    )

    response = get_manifest(http, proxy.url, "single/docker", "1")

    assert response.data == image.manifest_bytes
    assert registry_upstream.count_requests(remote_path) == before + 1


# fake_upstream.py


def test_fake_serves_blob_and_counts_hits(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    image = make_image("fake")
    fake.add_image("some/repo", "v1", image)
    blob = image.layers[1]
    path = fake.blob_path("some/repo", blob.digest)

    first = http.request("GET", fake.url + path)
    second = http.request("HEAD", fake.url + path)

    assert first.status == 200 and first.data == blob.data
    assert first.headers["Docker-Content-Digest"] == blob.digest
    assert second.headers["Content-Length"] == str(blob.size)
    assert fake.count(path) == 1 and fake.count(path, "HEAD") == 1
    assert fake.hits()[("GET", path)] == 1


def test_fake_serves_manifest_by_tag_and_digest(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    index = make_index("fake-index", oci=False)
    fake.add_index("multi", "2", index)

    by_tag = get_manifest(http, fake.url, "multi", "2")
    child = get_manifest(http, fake.url, "multi", index.images[0].manifest_digest)
    missing = get_manifest(http, fake.url, "multi", "3")

    assert by_tag.data == index.bytes
    assert by_tag.headers["Content-Type"] == DOCKER_LIST
    assert child.data == index.images[0].manifest_bytes
    assert missing.status == 404
    assert json.loads(missing.data)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_fake_drops_blob_midway_then_recovers(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    image = make_image("drop", layer_sizes=(200_000,))
    fake.add_image("r", "1", image)
    blob = image.layers[0]
    path = fake.blob_path("r", blob.digest)
    fake.add_fault(path, DropAfter(n_bytes=1000, times=1))

    with pytest.raises(urllib3.exceptions.ProtocolError):
        http.request("GET", fake.url + path)
    retry = http.request("GET", fake.url + path)

    assert retry.data == blob.data
    assert fake.count(path) == 2


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        (WrongBytes(), lambda r, body: r.status == 200 and r.data != body),
        (
            Status(status=429, headers={"Retry-After": "1"}),
            lambda r, body: r.status == 429 and r.headers["Retry-After"] == "1",
        ),
        (Status(status=503), lambda r, body: r.status == 503),
        (Trickle(chunk_size=64, interval=0.001), lambda r, body: r.data == body),
        (
            WrongContentType(),
            lambda r, body: (
                r.data == body and r.headers["Content-Type"] == "text/plain"
            ),
        ),
    ],
    ids=["wrong-bytes", "429", "503", "trickle", "content-type"],
)
def test_fake_faults_bend_the_answer(
    fake_upstream: FakeFactory,
    http: urllib3.PoolManager,
    fault: object,
    check: Callable[[urllib3.BaseHTTPResponse, bytes], bool],
) -> None:
    fake = fake_upstream()
    image = make_image("faults")
    fake.add_image("r", "1", image)
    path = fake.blob_path("r", image.config.digest)
    fake.add_fault(path, fault)  # type: ignore[arg-type]

    response = http.request("GET", fake.url + path)

    assert check(response, image.config.data)


def test_fake_serves_invalid_json_manifest(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    fake.add_image("r", "1", make_image("json"))
    fault = InvalidJson()
    fake.add_fault(fake.manifest_path("r", "1"), fault)

    response = get_manifest(http, fake.url, "r", "1")

    assert response.data == fault.body
    assert response.headers["Docker-Content-Digest"] == sha256_digest(fault.body)


def test_fake_stall_holds_until_released(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    image = make_image("stall")
    fake.add_image("r", "1", image)
    stall = fake.add_fault(fake.manifest_path("r", "1"), Stall(timeout=10))
    assert isinstance(stall, Stall)
    results: list[bytes] = []
    client = threading.Thread(
        target=lambda: results.append(get_manifest(http, fake.url, "r", "1").data)
    )

    client.start()
    assert stall.arrived.wait(5)
    held = not results
    stall.release.set()
    client.join(5)

    assert held
    assert results == [image.manifest_bytes]


def test_fake_stall_midway_then_drop_cuts_the_body(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    image = make_image("stall-drop", layer_sizes=(50_000,))
    fake.add_image("r", "1", image)
    path = fake.blob_path("r", image.layers[0].digest)
    stall = Stall(after_bytes=100, then_drop=True, timeout=10)
    fake.add_fault(path, stall)
    response = http.request("GET", fake.url + path, preload_content=False)

    assert stall.arrived.wait(5)
    first = response.read(100)
    stall.release.set()

    assert first == image.layers[0].data[:100]
    with pytest.raises(urllib3.exceptions.ProtocolError):
        response.read()
    fake.wait_for_count(path, 1)


def test_fake_disconnect_sends_no_response(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    fake.add_image("r", "1", make_image("disconnect"))
    fake.add_fault(fake.manifest_path("r", "1"), Disconnect(times=1))

    with pytest.raises(urllib3.exceptions.ProtocolError):
        get_manifest(http, fake.url, "r", "1")
    retry = get_manifest(http, fake.url, "r", "1")

    assert retry.status == 200


def test_fake_gate_makes_requests_overlap(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    fake.add_image("r", "1", make_image("gate"))
    gate = fake.gate()
    statuses: list[int] = []

    def pull() -> None:
        statuses.append(get_manifest(http, fake.url, "r", "1").status)

    clients = [threading.Thread(target=pull) for _ in range(5)]

    for client in clients:
        client.start()
    gate.wait_arrived(5)
    held = len(statuses)
    gate.release()
    for client in clients:
        client.join(5)

    assert held == 0
    assert statuses == [200] * 5


def test_fake_bearer_token_flow(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream(auth="bearer", credentials=("bob", "pw"))
    image = make_image("token")
    fake.add_image("team/app", "1", image)

    challenge = get_manifest(http, fake.url, "team/app", "1")
    header = challenge.headers["WWW-Authenticate"]
    token_url = f"{fake.url}/token?service=fake&scope=repository:team/app:pull"
    refused = http.request("GET", token_url)
    basic = urllib3.make_headers(basic_auth="bob:pw")
    token = json.loads(http.request("GET", token_url, headers=basic).data)["token"]
    url = f"{fake.url}/v2/team/app/manifests/1"
    authorised = http.request("GET", url, headers={"Authorization": f"Bearer {token}"})
    other_repo = f"{fake.url}/v2/other/manifests/1"
    wrong_scope = http.request(
        "GET", other_repo, headers={"Authorization": f"Bearer {token}"}
    )

    assert challenge.status == 401
    assert header == (
        f'Bearer realm="{fake.url}/token",service="fake",'
        'scope="repository:team/app:pull"'
    )
    assert refused.status == 401
    assert authorised.status == 200 and authorised.data == image.manifest_bytes
    assert wrong_scope.status == 401
    assert fake.authorization_headers()[-2:] == [f"Bearer {token}"] * 2


def test_fake_redirect_to_other_host_sees_no_credentials(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    storage = fake_upstream(address="127.0.0.4")
    fake = fake_upstream(auth="basic", credentials=("u", "p"))
    fake.redirect_blobs_to(storage)
    image = make_image("redirect")
    fake.add_image("r", "1", image)
    path = fake.blob_path("r", image.config.digest)
    basic = urllib3.make_headers(basic_auth="u:p")

    redirect = http.request("GET", fake.url + path, headers=basic)
    location = redirect.headers["Location"]
    blob = http.request("GET", location)

    assert redirect.status == 307
    assert location.startswith("http://127.0.0.4:")
    assert blob.data == image.config.data
    assert storage.count(path) == 1
    assert storage.authorization_headers() == []


def test_fake_answers_ranges_and_tag_lists(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    image = make_image("range")
    for tag in ("a", "b", "c"):
        fake.add_image("r", tag, image)
    path = fake.blob_path("r", image.config.digest)

    part = http.request("GET", fake.url + path, headers={"Range": "bytes=2-5"})
    page = http.request("GET", f"{fake.url}/v2/r/tags/list?n=2")

    assert part.status == 206 and part.data == image.config.data[2:6]
    assert part.headers["Content-Range"] == f"bytes 2-5/{image.config.size}"
    assert json.loads(page.data)["tags"] == ["a", "b"]
    assert 'rel="next"' in page.headers["Link"]


def test_fake_lists_referrers(
    fake_upstream: FakeFactory, http: urllib3.PoolManager
) -> None:
    fake = fake_upstream()
    subject = make_image("subject")
    artifact = make_artifact("signature", subject, "application/vnd.example.sig")
    fake.add_image("r", "1", subject)
    fake.add_image("r", artifact.manifest_digest, artifact)

    response = http.request(
        "GET", f"{fake.url}/v2/r/referrers/{subject.manifest_digest}"
    )

    entries = json.loads(response.data)["manifests"]
    assert [entry["digest"] for entry in entries] == [artifact.manifest_digest]
    assert entries[0]["artifactType"] == "application/vnd.example.sig"


# processes.py, with a stand-in for our server's command line

STUB_SERVER = """
import signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
if "--fail" in args:
    sys.exit("stub: told to fail")
port = int(args[args.index("--port") + 1])

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

def stop(signum, frame):
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print("stub serving", " ".join(args), file=sys.stderr, flush=True)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def stub_command(tmp_path: Path) -> list[str]:
    """A command that serves `/v2/` on `--port` the way our server would."""
    script = tmp_path / "stub_server.py"
    script.write_text(STUB_SERVER)
    return [sys.executable, str(script)]


def test_oci_server_starts_logs_and_stops(
    stub_command: list[str], tmp_path: Path
) -> None:
    server = OciServer(
        tmp_path / "cache",
        tmp_path / "run",
        args=["--air-gapped"],
        config={"logLevel": "info"},
        command=stub_command,
    )

    server.start()
    log = server.wait_for_log("stub serving")
    restarted = server.restart()
    code = server.stop()

    assert f"serve --host 127.0.0.1 --port {server.port} --air-gapped" in log
    assert "--config-file" in log and server.config_path.exists()
    assert restarted.starts == 2
    assert code == 0
    assert not server.is_running()


def test_oci_server_reports_early_exit_with_stderr(
    stub_command: list[str], tmp_path: Path
) -> None:
    server = OciServer(tmp_path, tmp_path, args=["--fail"], command=stub_command)

    with pytest.raises(ProcessStartError, match="told to fail"):
        server.start()
    assert not server.is_running()

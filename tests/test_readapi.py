"""tags/list, referrers and _catalog, through a real docker-registry upstream."""

from __future__ import annotations

import json
from types import SimpleNamespace
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from support.images import OCI_INDEX, Image, make_artifact, make_image
from support.push import Pusher

from ociregistry import readapi
from ociregistry.readapi import page_of, parse_paging, repository_of
from ociregistry.reference import Repository

TAGS = ["v1", "v2", "v3", "v4", "v5"]
SBOM = "application/vnd.example.sbom.v1+json"
SIGNATURE = "application/vnd.example.signature.v1+json"


@pytest.fixture
def tagged_upstream(registry_upstream_factory):
    """An upstream with `paged/tags` under five tags."""
    image = make_image("paged-tags", layer_sizes=(512,))
    return registry_upstream_factory({f"paged/tags:{tag}": image for tag in TAGS})


def serve(oci_server, *upstreams, args=(), **options):
    """Start our server configured to reach the upstreams over http."""
    config = {"registries": [u.registry_config() for u in upstreams]}
    return oci_server(*args, config=config, **options)


def get(server, path, headers=None):
    return server.client().request("GET", server.url + path, headers=headers)


def get_json(server, path):
    response = get(server, path)
    assert response.status == 200, response.data
    return json.loads(response.data), response.headers


def next_path(headers):
    """Return the path a `Link: <…>; rel="next"` header points at, or None."""
    link = headers.get("Link")
    if link is None:
        return None
    assert link.endswith('>; rel="next"'), link
    return link[1 : link.index(">")]


# -- paging rules, without a server -------------------------------------------


@pytest.mark.parametrize(
    ("count", "last", "expected", "has_more"),
    [
        (None, "", TAGS, False),
        (2, "", ["v1", "v2"], True),
        (2, "v4", ["v5"], False),
        (5, "", TAGS, False),
        (0, "", [], False),
        (None, "v3", ["v4", "v5"], False),
        (None, "v9", [], False),
        (3, "a", ["v1", "v2", "v3"], True),
        (2, "v2.5", ["v3", "v4"], True),
    ],
)
def test_page_of_follows_the_distribution_spec(count, last, expected, has_more):
    assert page_of(TAGS, count, last) == (expected, has_more)


@pytest.mark.parametrize("count", ["-1", "x", "1.5", "9999999999"])
def test_bad_page_size_is_refused(count):
    with pytest.raises(Exception, match="n must be a non-negative integer"):
        parse_paging({"n": count})


@pytest.mark.parametrize(
    ("image_url", "repository"),
    [
        ("127.0.0.2/multi/arch:1.0", "127.0.0.2/multi/arch"),
        ("127.0.0.1:5000/a/b@sha256:" + "0" * 64, "127.0.0.1:5000/a/b"),
        ("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000/a/b"),
        ("docker.io/library/hello-world:latest", "docker.io/library/hello-world"),
    ],
)
def test_repository_of_strips_the_reference(image_url, repository):
    assert repository_of(image_url) == repository


# -- tags/list -----------------------------------------------------------------


def test_tags_list_pages_through_the_upstream_tags(tagged_upstream, oci_server):
    server = serve(oci_server, tagged_upstream)
    path = f"/v2/{tagged_upstream.namespace}/paged/tags/tags/list?n=2"

    pages = []
    for _ in range(len(TAGS)):
        body, headers = get_json(server, path)
        pages.append(body["tags"])
        path = next_path(headers)
        if path is None:
            break

    assert pages == [["v1", "v2"], ["v3", "v4"], ["v5"]]
    assert body["name"] == f"{tagged_upstream.namespace}/paged/tags"


def test_tags_list_paging_edge_cases(tagged_upstream, oci_server):
    server = serve(oci_server, tagged_upstream)
    base = f"/v2/{tagged_upstream.namespace}/paged/tags/tags/list"
    cases = {
        "": (TAGS, None),
        "?n=0": ([], None),
        "?last=zzz": ([], None),
        "?n=2&last=zzz": ([], None),
        "?last=v3": (["v4", "v5"], None),
        "?n=5": (TAGS, None),
        "?n=100": (TAGS, None),
        "?n=4": (TAGS[:4], f"{base}?n=4&last=v4"),
    }

    answers = {query: get_json(server, base + query) for query in cases}

    for query, (tags, link) in cases.items():
        body, headers = answers[query]
        assert (body["tags"], next_path(headers)) == (tags, link), query
    refused = get(server, base + "?n=-1")
    assert refused.status == 400
    assert b"n must be a non-negative integer" in refused.data


def test_tags_list_link_keeps_the_ns_parameter(tagged_upstream, oci_server):
    server = serve(oci_server, tagged_upstream)
    ns = tagged_upstream.namespace

    body, headers = get_json(server, f"/v2/paged/tags/tags/list?ns={ns}&n=3")

    assert body == {"name": "paged/tags", "tags": ["v1", "v2", "v3"]}
    query = parse_qs(urlsplit(next_path(headers)).query)
    assert query == {"ns": [ns], "n": ["3"], "last": ["v3"]}
    assert headers["OCI-Namespace"] == ns


def test_upstream_tag_list_is_reused_briefly(tagged_upstream, oci_server):
    server = serve(oci_server, tagged_upstream)
    path = f"/v2/{tagged_upstream.namespace}/paged/tags/tags/list"

    first, _ = get_json(server, path)
    second, _ = get_json(server, path + "?n=1")

    assert first["tags"] == TAGS
    assert second["tags"] == ["v1"]
    assert tagged_upstream.count_requests("/v2/paged/tags/tags/list") == 1


def test_tags_list_offline_serves_cached_tags(tagged_upstream, oci_server):
    server = serve(oci_server, tagged_upstream)
    ns = tagged_upstream.namespace
    for tag in ("v4", "v2"):
        assert get(server, f"/v2/{ns}/paged/tags/manifests/{tag}").status == 200
    tagged_upstream.stop()

    whole, _ = get_json(server, f"/v2/{ns}/paged/tags/tags/list")
    first, headers = get_json(server, f"/v2/{ns}/paged/tags/tags/list?n=1")
    rest, rest_headers = get_json(server, next_path(headers))

    assert whole["tags"] == ["v2", "v4"]
    assert (first["tags"], rest["tags"]) == (["v2"], ["v4"])
    assert next_path(rest_headers) is None
    log = server.wait_for_log(f'serving cached tags: "{ns}/paged/tags"')
    assert "unreachable" in log


def test_tags_list_air_gapped_never_asks_the_upstream(tagged_upstream, oci_server):
    online = serve(oci_server, tagged_upstream)
    ns = tagged_upstream.namespace
    assert get(online, f"/v2/{ns}/paged/tags/manifests/v3").status == 200
    online.stop()
    offline = serve(oci_server, tagged_upstream, args=["--air-gapped"])

    body, _ = get_json(offline, f"/v2/{ns}/paged/tags/tags/list")
    unknown = get(offline, f"/v2/{ns}/other/repo/tags/list")

    assert body["tags"] == ["v3"]
    assert unknown.status == 404
    assert json.loads(unknown.data)["errors"][0]["code"] == "NAME_UNKNOWN"
    assert tagged_upstream.count_requests("/v2/paged/tags/tags/list") == 0


def test_tags_list_with_upstream_down_and_nothing_cached_is_502(
    tagged_upstream, oci_server
):
    server = serve(oci_server, tagged_upstream)
    tagged_upstream.stop()

    response = get(server, f"/v2/{tagged_upstream.namespace}/paged/tags/tags/list")

    assert response.status == 502
    message = json.loads(response.data)["errors"][0]["message"]
    assert message.startswith(f"upstream {tagged_upstream.namespace}: unreachable")


def test_tags_list_of_unknown_repository_is_name_unknown(registry_upstream, oci_server):
    server = serve(oci_server, registry_upstream)

    response = get(server, f"/v2/{registry_upstream.namespace}/no/such/tags/list")

    assert response.status == 404
    assert json.loads(response.data)["errors"][0]["code"] == "NAME_UNKNOWN"


def test_tags_list_of_session_content_is_case_sensitive_and_sorted(
    registry_upstream, oci_server
):
    server = serve(oci_server, registry_upstream)

    body, _ = get_json(
        server, f"/v2/{registry_upstream.namespace}/single/oci/tags/list"
    )

    assert body["tags"] == ["1", "CaseTag", "latest"]


# -- _catalog ------------------------------------------------------------------


def test_catalog_lists_cached_repositories_with_their_upstream(
    registry_upstream, oci_server
):
    server = serve(oci_server, registry_upstream)
    ns = registry_upstream.namespace
    for name in ("single/oci:1", "multi/arch:1.0", "a/b/c/d/e:1"):
        repo, tag = name.split(":")
        assert get(server, f"/v2/{ns}/{repo}/manifests/{tag}").status == 200
    expected = [f"{ns}/a/b/c/d/e", f"{ns}/multi/arch", f"{ns}/single/oci"]

    whole, _ = get_json(server, "/v2/_catalog")
    first, headers = get_json(server, "/v2/_catalog?n=2")
    rest, rest_headers = get_json(server, next_path(headers))

    assert whole == {"repositories": expected}
    assert (first["repositories"], rest["repositories"]) == (expected[:2], expected[2:])
    assert next_path(rest_headers) is None


def test_catalog_paging_edge_cases(registry_upstream, oci_server):
    server = serve(oci_server, registry_upstream)
    ns = registry_upstream.namespace
    for repo in ("single/oci", "single/docker"):
        assert get(server, f"/v2/{ns}/{repo}/manifests/1").status == 200
    names = [f"{ns}/single/docker", f"{ns}/single/oci"]
    cases = {
        "?n=0": [],
        "?last=zzz": [],
        f"?last={ns}/single/docker": names[1:],
        "?n=9": names,
    }

    answers = {query: get_json(server, "/v2/_catalog" + query) for query in cases}

    for query, repositories in cases.items():
        body, headers = answers[query]
        assert body["repositories"] == repositories, query
        assert "Link" not in headers, query


def test_empty_cache_has_an_empty_catalog(registry_upstream, oci_server):
    server = serve(oci_server, registry_upstream)

    body, _ = get_json(server, "/v2/_catalog")

    assert body == {"repositories": []}


# -- referrers -----------------------------------------------------------------


def tag_schema_index(*referrers: Image) -> bytes:
    """Return the index a client like ORAS pushes as the `sha256-<hex>` tag."""
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [referrer.descriptor() for referrer in referrers],
    }
    return json.dumps(index).encode()


@pytest.fixture
def signed_upstream(registry_upstream_factory):
    """An upstream with `signed/app:1`, an SBOM and a signature referring to it.

    docker-registry 2.8 has no referrers API, so the referrers are also listed
    under the tag schema's `sha256-<hex>` tag, as ORAS and cosign do.
    """
    app = make_image("signed-app")
    sbom = make_artifact("sbom", app, SBOM, annotations={"kind": "sbom"})
    signature = make_artifact("signature", app, SIGNATURE)
    upstream = registry_upstream_factory({"signed/app:1": app})
    pusher = Pusher(upstream.url)
    for artifact in (sbom, signature):
        pusher.push_image("signed/app", artifact.digest, artifact)
    tag = app.digest.replace(":", "-")
    pusher.push_manifest(
        "signed/app", tag, tag_schema_index(sbom, signature), OCI_INDEX
    )
    upstream.content.update(app=app, sbom=sbom, signature=signature)
    return upstream


def referrer_summary(body):
    return sorted((e["digest"], e.get("artifactType")) for e in body["manifests"])


def test_referrers_come_from_the_upstream_tag_schema(signed_upstream, oci_server):
    server = serve(oci_server, signed_upstream)
    app, sbom, signature = (
        signed_upstream.content[k] for k in ("app", "sbom", "signature")
    )
    path = f"/v2/{signed_upstream.namespace}/signed/app/referrers/{app.digest}"

    response = get(server, path)

    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    body = json.loads(response.data)
    assert body["mediaType"] == OCI_INDEX
    assert referrer_summary(body) == sorted(
        [(sbom.digest, SBOM), (signature.digest, SIGNATURE)]
    )


def test_referrers_are_filtered_by_artifact_type(signed_upstream, oci_server):
    server = serve(oci_server, signed_upstream)
    app, sbom = signed_upstream.content["app"], signed_upstream.content["sbom"]
    path = f"/v2/{signed_upstream.namespace}/signed/app/referrers/{app.digest}"

    filtered = get(server, f"{path}?{urlencode({'artifactType': SBOM})}")
    typed = get(server, f"{path}?artifactType={SBOM}")
    unfiltered = get(server, path)

    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert referrer_summary(json.loads(filtered.data)) == [(sbom.digest, SBOM)]
    assert referrer_summary(json.loads(typed.data)) == [(sbom.digest, SBOM)]
    assert "OCI-Filters-Applied" not in unfiltered.headers


def test_referrers_are_cached_and_served_air_gapped(signed_upstream, oci_server):
    online = serve(oci_server, signed_upstream)
    content = signed_upstream.content
    app, sbom = content["app"], content["sbom"]
    repo = f"/v2/{signed_upstream.namespace}/signed/app"
    listed = json.loads(get(online, f"{repo}/referrers/{app.digest}").data)
    pulled = get(online, f"{repo}/manifests/{sbom.digest}")
    payload = get(online, f"{repo}/blobs/{sbom.layers[0].digest}")
    online.stop()
    signed_upstream.stop()

    offline = serve(oci_server, signed_upstream, args=["--air-gapped"])
    answer = get(offline, f"{repo}/referrers/{app.digest}")
    query = urlencode({"artifactType": SIGNATURE})
    filtered = get(offline, f"{repo}/referrers/{app.digest}?{query}")
    manifest = get(offline, f"{repo}/manifests/{sbom.digest}")
    blob = get(offline, f"{repo}/blobs/{sbom.layers[0].digest}")

    assert (pulled.status, payload.status) == (200, 200)
    assert answer.status == 200
    offline_body = json.loads(answer.data)
    assert referrer_summary(offline_body) == referrer_summary(listed)
    sbom_entry = next(
        e for e in offline_body["manifests"] if e["digest"] == sbom.digest
    )
    assert sbom_entry["annotations"] == {"kind": "sbom"}
    assert sbom_entry["size"] == sbom.size
    assert referrer_summary(json.loads(filtered.data)) == [
        (content["signature"].digest, SIGNATURE)
    ]
    assert (manifest.status, manifest.data) == (200, sbom.bytes)
    assert (blob.status, blob.data) == (200, sbom.layers[0].data)


def test_referrers_of_unreferenced_digest_is_an_empty_index(
    signed_upstream, oci_server
):
    server = serve(oci_server, signed_upstream)
    unreferenced = signed_upstream.content["sbom"].digest
    path = f"/v2/{signed_upstream.namespace}/signed/app/referrers/{unreferenced}"

    body, _ = get_json(server, path)

    assert body == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def test_referrers_with_a_bad_digest_is_digest_invalid(registry_upstream, oci_server):
    server = serve(oci_server, registry_upstream)

    response = get(
        server, f"/v2/{registry_upstream.namespace}/single/oci/referrers/sha256:nope"
    )

    assert response.status == 400
    assert json.loads(response.data)["errors"][0]["code"] == "DIGEST_INVALID"


def test_referrers_api_of_the_upstream_is_used_when_it_has_one(
    fake_upstream, oci_server
):
    fake = fake_upstream()
    app = make_image("fake-app")
    sbom = make_artifact("fake-sbom", app, SBOM)
    fake.add("apps/app", "1", app)
    fake.add("apps/app", sbom.digest, sbom)
    server = serve(oci_server, fake)
    path = f"/v2/apps/app/referrers/{app.digest}"

    body, _ = get_json(server, f"{path}?ns={fake.namespace}")

    assert referrer_summary(body) == [(sbom.digest, SBOM)]
    assert fake.count(path) == 1
    tag = app.digest.replace(":", "-")
    assert fake.count(fake.manifest_path("apps/app", tag)) == 0
    assert fake.count(fake.manifest_path("apps/app", sbom.digest)) == 1


def test_paged_upstream_referrers_are_followed(monkeypatch):
    pages = {
        "/v2/apps/app/referrers/" + "sha256:" + "e" * 64: ("/page2", ["a"]),
        "/page2": ("/page3", ["b"]),
        "/page3": ("", ["c"]),
    }

    def fetch_json(upstream, path, repo, accept=""):
        link, digests = pages[path]
        entries = [{"digest": digest} for digest in digests]
        return 200, {"manifests": entries}, link

    monkeypatch.setattr(readapi, "fetch_json", fetch_json)
    cache = SimpleNamespace(
        settings=None, store=None, client=SimpleNamespace(upstream=lambda name: name)
    )
    read_api = readapi.ReadApi(None, cache)

    entries = read_api.upstream_referrers(
        Repository("127.0.0.9", "apps/app"), "sha256:" + "e" * 64
    )

    assert [entry["digest"] for entry in entries] == ["a", "b", "c"]

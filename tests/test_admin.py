"""The /cmd administration endpoints, on a cache filled through a real upstream."""

from __future__ import annotations

import pytest
from support.processes import wait_until

pytest_plugins = ["support.cache_fill"]

OLD = "2020-01-01T00:00:00"


@pytest.fixture
def admin_server(cache_copy, oci_server):
    """Our server, air-gapped, on a private copy of the filled cache."""
    return oci_server("--air-gapped", image_path=cache_copy.root)


def call(server, method: str, path: str):
    """Send one request; return the status and the body's lines."""
    response = server.client().request(method, server.url + path)
    return response.status, response.data.decode().splitlines()


def manifest_line(cache, name: str) -> str:
    """Return the prune report line of a `repo:tag`."""
    return f"manifest {cache.url(name)} {cache.image(name).digest}"


# -- DELETE /cmd/prune ----------------------------------------------------------


def test_cmd_prune_by_pattern_removes_from_disk_and_from_serving(
    cache_copy, admin_server
):
    image = cache_copy.image("app/one:1")

    status, lines = call(admin_server, "DELETE", "/cmd/prune?type=pattern&expr=app/one")

    assert status == 200
    assert manifest_line(cache_copy, "app/one:1") in lines
    assert lines[-1].startswith("removed 1 manifests and 2 blobs")
    assert image.digest not in cache_copy.manifest_digests()
    path = f"/v2/{cache_copy.namespace}/app/one/manifests/1"
    assert call(admin_server, "GET", path)[0] == 404


def test_cmd_prune_pattern_takes_several_expressions(cache_copy, admin_server):
    status, lines = call(
        admin_server, "DELETE", "/cmd/prune?type=pattern&expr=app/one,other/img"
    )

    assert status == 200
    assert manifest_line(cache_copy, "app/one:1") in lines
    assert manifest_line(cache_copy, "other/img:latest") in lines
    assert lines[-1].startswith("removed 2 manifests")


def test_cmd_prune_dry_run_changes_nothing(cache_copy, admin_server):
    before = cache_copy.tree_state()

    status, lines = call(
        admin_server, "DELETE", "/cmd/prune?type=pattern&expr=app/&dryRun=true"
    )

    assert status == 200
    assert manifest_line(cache_copy, "app/two:1") in lines
    assert lines[-1].startswith("dry run: would remove 2 manifests and 5 blobs")
    assert cache_copy.tree_state() == before
    assert call(admin_server, "GET", "/cmd/manifest/list?pattern=app/")[1] != []


def test_cmd_prune_by_created_age(cache_copy, oci_server):
    one = cache_copy.image("app/one:1")
    cache_copy.set_stamps(one.digest, created=OLD)
    server = oci_server("--air-gapped", image_path=cache_copy.root)

    status, lines = call(server, "DELETE", "/cmd/prune?type=created&dur=30d")

    assert status == 200
    assert lines[:-1] == [manifest_line(cache_copy, "app/one:1")] + [
        f"blob {blob.digest} {blob.size}"
        for blob in sorted([one.config, one.layers[1]], key=lambda b: b.digest)
    ]


def test_cmd_prune_by_accessed_age(cache_copy, oci_server):
    two = cache_copy.image("app/two:1")
    cache_copy.set_stamps(two.digest, pulled=OLD)
    server = oci_server("--air-gapped", image_path=cache_copy.root)

    status, lines = call(server, "DELETE", "/cmd/prune?type=accessed&dur=1h")

    assert status == 200
    assert [line for line in lines if line.startswith("manifest ")] == [
        manifest_line(cache_copy, "app/two:1")
    ]
    assert two.digest not in cache_copy.manifest_digests()


def test_cmd_prune_count_limits_the_manifests_removed(cache_copy, admin_server):
    before = cache_copy.manifest_digests()

    status, lines = call(
        admin_server, "DELETE", "/cmd/prune?type=pattern&expr=app/&count=1"
    )

    assert status == 200
    assert [line for line in lines if line.startswith("manifest ")] == [
        manifest_line(cache_copy, "app/one:1")
    ]
    assert cache_copy.manifest_digests() == before - {
        cache_copy.image("app/one:1").digest
    }


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "type: expected one of accessed, created, pattern, got ''"),
        ("type=size", "type: expected one of accessed, created, pattern"),
        ("type=pattern", "expr: required with type=pattern"),
        ("type=pattern&expr=a(b", "bad regular expression 'a(b'"),
        ("type=created", "dur: required with type=accessed or created"),
        ("type=accessed&dur=soon", "dur: expected a duration such as 30d or 12h"),
        ("type=created&dur=0", "dur: expected a duration such as 30d or 12h"),
        ("type=pattern&expr=x&count=many", "count: expected a number, or -1"),
        ("type=pattern&expr=x&count=-2", "count: expected a number, or -1"),
        ("type=pattern&expr=x&dryRun=maybe", "dryRun: expected true or false"),
    ],
)
def test_cmd_prune_bad_parameters_are_400_with_a_message(
    cache_copy, admin_server, query, message
):
    before = cache_copy.tree_state()

    response = admin_server.client().request(
        "DELETE", f"{admin_server.url}/cmd/prune?{query}"
    )

    assert response.status == 400
    assert response.headers["Content-Type"].startswith("text/plain")
    assert message in response.data.decode()
    assert cache_copy.tree_state() == before


# -- the list endpoints -------------------------------------------------------


def test_cmd_image_list_shows_images_and_their_blobs(cache_copy, admin_server):
    one = cache_copy.image("app/one:1")

    status, lines = call(admin_server, "GET", "/cmd/image/list?pattern=app/one")

    assert status == 200
    record = cache_copy.record(one.digest)
    assert lines == [
        f"{cache_copy.url('app/one:1')} {one.digest} "
        f"{record['created']} {record['pulled']}",
        *[f"- {blob.digest}" for blob in one.blobs],
    ]


def test_cmd_image_list_by_blob_digest_finds_every_image_using_it(
    cache_copy, admin_server
):
    base = cache_copy.image("app/one:1").layers[0].digest

    status, lines = call(admin_server, "GET", f"/cmd/image/list?digest={base[7:19]}")

    images = [line.split()[0] for line in lines if not line.startswith("- ")]
    assert status == 200
    assert images == [cache_copy.url("app/one:1"), cache_copy.url("app/two:1")]


def test_cmd_image_list_leaves_out_indexes_and_obeys_count(cache_copy, admin_server):
    everything = call(admin_server, "GET", "/cmd/image/list?count=-1")[1]

    status, lines = call(admin_server, "GET", "/cmd/image/list?count=2")

    images = [line.split()[0] for line in everything if not line.startswith("- ")]
    assert cache_copy.url("multi/arch:1.0") not in images
    assert len(images) == 5
    assert status == 200
    assert len([line for line in lines if not line.startswith("- ")]) == 2


def test_cmd_manifest_list_filters_by_pattern_and_count(cache_copy, admin_server):
    everything = call(admin_server, "GET", "/cmd/manifest/list?count=-1")[1]

    status, lines = call(
        admin_server, "GET", "/cmd/manifest/list?pattern=multi,other&count=2"
    )

    assert len(everything) == 6
    assert status == 200
    assert [line.split()[:3] for line in lines] == [
        [cache_copy.url("multi/arch"), "1.0", "list"],
        [
            cache_copy.url("multi/arch"),
            cache_copy.image("multi/arch:1.0").digest,
            "image",
        ],
    ]


def test_cmd_manifest_list_default_count_is_50(cache_copy, admin_server):
    status, lines = call(admin_server, "GET", "/cmd/manifest/list")

    assert status == 200
    assert len(lines) == 6  # fewer than the default limit of 50


def test_cmd_blob_list_shows_sizes_and_reference_counts(cache_copy, admin_server):
    base = cache_copy.image("app/one:1").layers[0]
    own = cache_copy.image("app/one:1").layers[1]

    shared = call(admin_server, "GET", f"/cmd/blob/list?substr={base.digest[7:20]}")
    single = call(admin_server, "GET", f"/cmd/blob/list?substr={own.digest}")

    assert shared == (200, [f"{base.digest} {base.size} 2"])
    assert single == (200, [f"{own.digest} {own.size} 1"])


def test_cmd_blob_list_is_sorted_and_obeys_count(cache_copy, admin_server):
    everything = call(admin_server, "GET", "/cmd/blob/list?count=-1")[1]

    status, lines = call(admin_server, "GET", "/cmd/blob/list?count=3")

    assert len(everything) == len(cache_copy.blob_names())
    assert everything == sorted(everything)
    assert status == 200
    assert lines == everything[:3]


@pytest.mark.parametrize(
    "path",
    [
        "/cmd/image/list?count=x",
        "/cmd/image/list?pattern=(",
        "/cmd/manifest/list?pattern=(",
        "/cmd/manifest/list?count=1.5",
        "/cmd/blob/list?count=-7",
    ],
)
def test_cmd_list_bad_parameters_are_400(admin_server, path):
    status, lines = call(admin_server, "GET", path)

    assert status == 400
    assert lines and lines[0]


# -- GET /cmd/stop --------------------------------------------------------------


def test_cmd_stop_stops_the_server_gracefully(admin_server):
    status, lines = call(admin_server, "GET", "/cmd/stop")

    assert (status, lines) == (200, ["stopping"])
    wait_until(lambda: not admin_server.is_running(), 15, "server exit")
    assert admin_server.process.returncode == 0
    assert "server stopped" in admin_server.read_log()

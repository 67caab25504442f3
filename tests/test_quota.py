"""The size quota: least recently pulled images go first, nothing in use."""

from __future__ import annotations

import datetime
import logging
import os

import pytest
from support.images import (
    Blob,
    Image,
    make_image,
    make_index,
    make_layer,
    serialise,
    sha256_digest,
)
from support.processes import wait_until

from ociregistry.manifest import TIME_FORMAT, Manifest, now_stamp
from ociregistry.prune import Pruner
from ociregistry.quota import Quota, eviction_order
from ociregistry.store import Store

HOST = "127.0.0.9"
LAYER = 100_000  # bytes of seeded, incompressible layer data
IN_USE_FOR = 60.0


def stamp(days_ago: float) -> str:
    moment = datetime.datetime.now() - datetime.timedelta(days=days_ago)
    return moment.strftime(TIME_FORMAT)


def put_image(
    store: Store, name: str, image: Image, pulled: str, reference: str = ":1"
) -> Manifest:
    """Cache an image's blobs and manifest as `HOST/name:1`, pulled then."""
    for blob in image.blobs:
        if not store.has_blob(blob.hex):
            writer = store.new_blob_writer(blob.hex)
            writer.write(blob.data)
            writer.commit(blob.size)
    url = f"{HOST}/{name}{reference}"
    record = store.put_manifest(
        Manifest(image.digest, image.media_type, image.bytes, [url]), url
    )
    record.pulled = record.created = pulled
    return record


def quota_for(store: Store, max_bytes: int, is_in_use=lambda hex_digest: False):
    return Quota(Pruner(store, is_in_use), store, max_bytes, IN_USE_FOR)


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "cache"))


@pytest.fixture
def images(store):
    """Three cached images, pulled 3, 2 and 1 days ago."""
    made = {
        name: make_image(f"quota-{name}", layer_sizes=(LAYER,))
        for name in ("old", "mid", "new")
    }
    for days, name in zip((3, 2, 1), made, strict=True):
        put_image(store, f"quota/{name}", made[name], stamp(days))
    return made


def cached_names(store: Store) -> set[str]:
    return {
        m.image_urls[0].split("/")[-1].split(":")[0].split("@")[0]
        for m in store.manifests()
    }


def has_blobs(store: Store, image: Image) -> bool:
    return all(store.has_blob(blob.hex) for blob in image.blobs)


# -- evicting, in process ------------------------------------------------------


def test_cache_under_its_quota_keeps_everything(store, images):
    quota = quota_for(store, max_bytes=10 * LAYER)

    result = quota.enforce()

    assert result is None
    assert cached_names(store) == {"old", "mid", "new"}


def test_least_recently_pulled_image_is_evicted_first(store, images):
    quota = quota_for(store, max_bytes=quota_for(store, 0).usage() - LAYER // 2)

    result = quota.enforce()

    assert [m.image_urls[0] for m in result.manifests] == [f"{HOST}/quota/old:1"]
    assert cached_names(store) == {"mid", "new"}
    assert not any(store.has_blob(blob.hex) for blob in images["old"].blobs)
    assert has_blobs(store, images["mid"]) and has_blobs(store, images["new"])
    assert quota.usage() <= quota.max_bytes


def test_eviction_goes_on_until_the_cache_fits(store, images):
    quota = quota_for(store, max_bytes=int(1.5 * LAYER))

    quota.enforce()

    assert cached_names(store) == {"new"}
    assert has_blobs(store, images["new"])


def test_pull_order_not_creation_order_decides(store, images):
    old = next(m for m in store.manifests() if "quota/old" in m.image_urls[0])
    old.pulled = stamp(0.5)  # pulled again lately, though created first
    quota = quota_for(store, max_bytes=quota_for(store, 0).usage() - LAYER // 2)

    quota.enforce()

    assert cached_names(store) == {"old", "new"}


def test_shared_blob_stays_while_another_image_uses_it(store):
    shared, _ = make_layer("quota-shared", LAYER)
    first = put_image(store, "share/first", _with_layer("first", shared), stamp(2))
    put_image(store, "share/second", _with_layer("second", shared), stamp(1))
    quota = quota_for(store, max_bytes=quota_for(store, 0).usage() - 1)

    result = quota.enforce()

    assert result.manifests == [first]
    assert store.has_blob(shared.hex)
    assert cached_names(store) == {"second"}


def test_recently_pulled_image_is_never_evicted(store, images, caplog):
    for manifest in store.manifests():
        manifest.pulled = now_stamp()
    quota = quota_for(store, max_bytes=LAYER)

    with caplog.at_level(logging.WARNING, logger="ociregistry.quota"):
        result = quota.enforce()

    assert result.manifests == []
    assert cached_names(store) == {"old", "mid", "new"}
    assert "cache root over quota" in caplog.text


def test_blob_being_served_is_kept(store, images):
    served = images["old"].layers[0].hex
    usage = quota_for(store, 0).usage()
    quota = quota_for(store, max_bytes=usage - 1, is_in_use=served.__eq__)

    result = quota.enforce()

    assert cached_names(store) == {"mid", "new"}
    assert result.kept_in_use == [served]
    assert store.has_blob(served)


def test_index_is_evicted_with_its_images(store):
    index = make_index("quota-index", layer_sizes=(LAYER,))
    url = f"{HOST}/quota/index:1"
    record = Manifest(index.digest, index.media_type, index.bytes, [url])
    store.put_manifest(record, url).pulled = record.created = stamp(6)
    for image in index.images:
        put_image(store, "quota/index", image, stamp(5), reference=f"@{image.digest}")
    put_image(store, "quota/other", make_image("quota-other", (LAYER,)), stamp(1))
    quota = quota_for(store, max_bytes=int(1.5 * LAYER))

    result = quota.enforce()

    assert len(result.manifests) == 1 + len(index.images)
    assert cached_names(store) == {"other"}
    assert not any(store.has_blob(blob.hex) for blob in index.blobs)


def test_eviction_order_is_by_last_pull(store, images):
    order = eviction_order(store.manifests())

    assert [m.image_urls[0].split("/")[-1] for m in order] == [
        "old:1",
        "mid:1",
        "new:1",
    ]


def test_no_quota_never_watches(store):
    quota = quota_for(store, max_bytes=0)

    quota.start()

    assert not quota._task.is_running


def _with_layer(seed: str, layer: Blob) -> Image:
    """Return an image whose only layer is `layer` (and a config of its own)."""
    base = make_image(f"quota-{seed}", layer_sizes=(1,))
    manifest = base.manifest()
    manifest["layers"] = [layer.descriptor()]
    data = serialise(manifest)
    return Image(data, sha256_digest(data), base.media_type, base.config, [layer])


# -- end to end, through a real upstream --------------------------------------


def get(server, path):
    return server.client().request("GET", server.url + path)


def pull(server, ns, name, image):
    """Pull an image's manifest and every blob through our server."""
    assert get(server, f"/v2/{ns}/{name}/manifests/1").status == 200
    for blob in image.blobs:
        response = get(server, f"/v2/{ns}/{name}/blobs/{blob.digest}")
        assert (response.status, response.data) == (200, blob.data)


def next_second() -> None:
    """Wait for the clock's second to change, as records stamp whole seconds."""
    now = datetime.datetime.now().replace(microsecond=0)
    wait_until(
        lambda: datetime.datetime.now() >= now + datetime.timedelta(seconds=1), 5
    )


def test_quota_evicts_the_oldest_image_and_nothing_in_use(
    registry_upstream_factory, oci_server, cache_root
):
    size = 1 << 20
    made = {
        n: make_image(f"e2e-{n}", layer_sizes=(size,)) for n in ("old", "mid", "new")
    }
    upstream = registry_upstream_factory({f"q/{n}:1": made[n] for n in made})
    config = {
        "registries": [upstream.registry_config()],
        "pruneConfig": {"maxBytes": int(2.5 * size)},
    }
    in_use_for = 4  # seconds: the pull timeout, generous for a loaded machine
    server = oci_server("--pull-timeout", str(in_use_for * 1000), config=config)
    ns = upstream.namespace
    pull(server, ns, "q/old", made["old"])
    next_second()
    pull(server, ns, "q/mid", made["mid"])
    in_use_over = datetime.datetime.now() + datetime.timedelta(seconds=in_use_for + 1)
    wait_until(lambda: datetime.datetime.now() > in_use_over, 10, "in-use window")

    pull(server, ns, "q/new", made["new"])
    server.wait_for_log("cache quota: evicted", timeout=20)

    records = set(os.listdir(cache_root / "img"))
    blobs = set(os.listdir(cache_root / "blobs"))
    assert made["old"].hex not in records
    assert made["old"].layers[0].hex not in blobs
    assert {made["mid"].hex, made["new"].hex} <= records
    assert {made[n].layers[0].hex for n in ("mid", "new")} <= blobs
    assert f'"{ns}/q/old:1"' in server.read_log()
    pull(server, ns, "q/old", made["old"])  # evicted content is pulled again


def test_quota_spares_images_pulled_within_the_pull_timeout(
    registry_upstream_factory, oci_server, cache_root
):
    size = 1 << 20
    made = {n: make_image(f"busy-{n}", layer_sizes=(size,)) for n in ("one", "two")}
    upstream = registry_upstream_factory({f"q/{n}:1": made[n] for n in made})
    config = {
        "registries": [upstream.registry_config()],
        "pruneConfig": {"maxBytes": size},
    }
    server = oci_server(config=config)  # in use for the default 60 s
    ns = upstream.namespace

    for name in made:
        pull(server, ns, f"q/{name}", made[name])
    server.wait_for_log("cache root over quota", timeout=20)

    records = set(os.listdir(cache_root / "img"))
    assert {made["one"].hex, made["two"].hex} <= records
    assert "cache quota: evicted" not in server.read_log()

"""Pruning: the `prune` command, the shared removal rules, and prunes racing pulls."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from support.processes import REPO_ROOT, OciServer, ProcessStartError

from ociregistry.config import Settings
from ociregistry.downloads import Download, Downloads
from ociregistry.listing import split_image_url
from ociregistry.prune import Pruner, Selection, age_selection
from ociregistry.reference import Repository
from ociregistry.rootlock import RootLock
from ociregistry.store import Store
from ociregistry.upstream import UpstreamClient

pytest_plugins = ["support.cache_fill"]

OLD = "2020-01-01T00:00:00"
CLIENTS = 10
ROUNDS = 3
MAX_PRUNES = 2000


def run_prune(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `ociregistry --image-path root prune ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "ociregistry", "--image-path", str(root), "prune"]
        + list(args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def own_blobs(cache, name: str) -> set[str]:
    """Return the digests of the config and layers of a `repo:tag`."""
    return {blob.digest for blob in cache.image(name).blobs}


# -- the prune command -------------------------------------------------------


def test_prune_by_pattern_removes_matching_manifests_and_their_blobs(cache_copy):
    image = cache_copy.image("other/img:latest")
    before_blobs = cache_copy.blob_names()

    result = run_prune(cache_copy.root, "--pattern", "other/img")

    assert result.returncode == 0, result.stderr
    url = cache_copy.url("other/img:latest")
    assert f"manifest {url} {image.digest}" in result.stdout.splitlines()
    for blob in image.blobs:
        assert f"blob {blob.digest} {blob.size}" in result.stdout.splitlines()
    assert "removed 1 manifests and 2 blobs" in result.stdout
    assert image.digest not in cache_copy.manifest_digests()
    assert cache_copy.blob_names() == before_blobs - own_blobs(
        cache_copy, "other/img:latest"
    )


def test_prune_of_an_index_takes_its_cached_image_manifests(cache_copy):
    index = cache_copy.content["multi/arch:1.0"]
    image = cache_copy.image("multi/arch:1.0")

    result = run_prune(cache_copy.root, "--pattern", "multi/arch:1.0$")

    assert result.returncode == 0, result.stderr
    assert index.digest not in cache_copy.manifest_digests()
    assert image.digest not in cache_copy.manifest_digests()
    assert not own_blobs(cache_copy, "multi/arch:1.0") & cache_copy.blob_names()
    assert "removed 2 manifests and 3 blobs" in result.stdout


def test_shared_blobs_stay_while_another_manifest_references_them(cache_copy):
    one, two = cache_copy.image("app/one:1"), cache_copy.image("app/two:1")
    base = one.layers[0].digest
    assert base == two.layers[0].digest

    first = run_prune(cache_copy.root, "--pattern", "app/one")

    assert first.returncode == 0, first.stderr
    assert base in cache_copy.blob_names()
    assert f"blob {base}" not in first.stdout
    assert not {one.config.digest, one.layers[1].digest} & cache_copy.blob_names()

    second = run_prune(cache_copy.root, "--pattern", "app/two")

    assert second.returncode == 0, second.stderr
    assert f"blob {base} {two.layers[0].size}" in second.stdout.splitlines()
    assert base not in cache_copy.blob_names()


def test_prune_by_date_removes_manifests_created_before_it(cache_copy):
    one, big = cache_copy.image("app/one:1"), cache_copy.image("big/layer:1")
    cache_copy.set_stamps(one.digest, created=OLD)
    cache_copy.set_stamps(big.digest, created=OLD)
    before = cache_copy.manifest_digests()

    result = run_prune(cache_copy.root, "--date", "2021-01-01T00:00:00")

    assert result.returncode == 0, result.stderr
    assert cache_copy.manifest_digests() == before - {one.digest, big.digest}
    assert "removed 2 manifests" in result.stdout


def test_prune_by_pattern_and_date_removes_only_what_meets_both(cache_copy):
    one = cache_copy.image("app/one:1")
    cache_copy.set_stamps(one.digest, created=OLD)
    cache_copy.set_stamps(cache_copy.image("big/layer:1").digest, created=OLD)
    before = cache_copy.manifest_digests()

    result = run_prune(
        cache_copy.root, "--pattern", "app/", "--date", "2021-01-01T00:00:00"
    )

    assert result.returncode == 0, result.stderr
    assert cache_copy.manifest_digests() == before - {one.digest}


def test_prune_dry_run_changes_nothing(cache_copy):
    before = cache_copy.tree_state()

    result = run_prune(cache_copy.root, "--pattern", "app/", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert cache_copy.tree_state() == before
    lines = result.stdout.splitlines()
    assert (
        f"manifest {cache_copy.url('app/one:1')} {cache_copy.image('app/one:1').digest}"
        in lines
    )
    base = cache_copy.image("app/one:1").layers[0]
    assert f"blob {base.digest} {base.size}" in lines
    assert lines[-1].startswith("dry run: would remove 2 manifests and 5 blobs")


def test_prune_without_criteria_is_refused(cache_copy):
    before = cache_copy.tree_state()

    result = run_prune(cache_copy.root)

    assert result.returncode == 1
    assert (
        result.stderr
        == "ociregistry: prune needs --pattern or --date (see prune --help)\n"
    )
    assert cache_copy.tree_state() == before


def test_pruned_cache_serves_what_remains_and_not_what_went(cache_copy, oci_server):
    run_prune(cache_copy.root, "--pattern", "app/one")

    server = oci_server("--air-gapped", image_path=cache_copy.root)

    blobs = cache_copy.pull(server, "app/two:1")
    assert {b.digest for b in blobs} == own_blobs(cache_copy, "app/two:1")
    url = f"{server.url}/v2/{cache_copy.namespace}/app/one/manifests/1"
    assert server.client().request("GET", url).status == 404


# -- the cache root lock -----------------------------------------------------


def test_prune_refuses_while_a_server_runs_on_the_cache_root(cache_copy, oci_server):
    server = oci_server("--air-gapped", image_path=cache_copy.root)
    before = cache_copy.tree_state()

    refused = run_prune(cache_copy.root, "--pattern", "app/")

    assert refused.returncode == 1
    assert refused.stderr == (
        f"ociregistry: cache root {cache_copy.root} is in use by a running server\n"
    )
    assert cache_copy.tree_state() == before
    server.stop()
    assert run_prune(cache_copy.root, "--pattern", "app/").returncode == 0


def test_server_refuses_a_cache_root_a_command_holds(cache_copy, tmp_path):
    lock = RootLock(str(cache_copy.root))
    lock.hold_exclusive()
    server = OciServer(cache_copy.root, tmp_path / "server", args=["--air-gapped"])

    try:
        with pytest.raises(ProcessStartError):
            server.start()
    finally:
        lock.release()

    assert "is in use by a prune or load command" in server.read_stderr()


def test_servers_share_the_root_lock_and_commands_exclude_them(tmp_path):
    first, second, command = (RootLock(str(tmp_path)) for _ in range(3))

    first.hold_shared()
    second.hold_shared()

    with pytest.raises(Exception, match="in use by a running server"):
        command.hold_exclusive()
    first.release()
    second.release()
    command.hold_exclusive()
    with pytest.raises(Exception, match="in use by a prune or load command"):
        first.hold_shared()
    command.release()


# -- the pruner, in process --------------------------------------------------


@pytest.mark.parametrize(
    ("url", "image", "reference"),
    [
        ("127.0.0.2/app/one:1", "127.0.0.2/app/one", "1"),
        ("host:5000/a/b/c:v1.2", "host:5000/a/b/c", "v1.2"),
        ("docker.io/library/x@sha256:ab", "docker.io/library/x", "sha256:ab"),
    ],
)
def test_split_image_url_separates_the_reference(url, image, reference):
    assert split_image_url(url) == (image, reference)


def test_count_picks_the_oldest_first(cache_copy):
    one, two = cache_copy.image("app/one:1"), cache_copy.image("app/two:1")
    cache_copy.set_stamps(one.digest, created="2020-02-01T00:00:00")
    cache_copy.set_stamps(two.digest, created=OLD)
    pruner = Pruner(Store(str(cache_copy.root)))

    result = pruner.prune(age_selection("created", 3600, count=1))

    assert [m.digest for m in result.manifests] == [two.digest]
    assert one.digest in cache_copy.manifest_digests()


def test_accessed_selection_looks_at_the_pulled_time(cache_copy):
    one = cache_copy.image("app/one:1")
    cache_copy.set_stamps(one.digest, pulled=OLD)
    pruner = Pruner(Store(str(cache_copy.root)))

    result = pruner.prune(age_selection("accessed", 3600), dry_run=True)

    assert [m.digest for m in result.manifests] == [one.digest]


def test_blobs_in_use_are_kept(cache_copy):
    image = cache_copy.image("other/img:latest")
    layer = image.layers[0].digest[7:]
    pruner = Pruner(Store(str(cache_copy.root)), is_in_use=lambda hex: hex == layer)

    result = pruner.prune(Selection(patterns=("other/img",)))

    assert result.kept_in_use == [layer]
    assert f"sha256:{layer}" in cache_copy.blob_names()
    assert image.config.digest not in cache_copy.blob_names()
    assert "kept 1 blobs in use" in result.summary()


def test_orphan_blobs_go_only_once_older_than_the_orphan_age(cache_copy):
    orphan = b"a blob no manifest references"
    hex_digest = hashlib.sha256(orphan).hexdigest()
    (cache_copy.root / "blobs" / hex_digest).write_bytes(orphan)
    store = Store(str(cache_copy.root))

    young = Pruner(store, orphan_age=600).prune(Selection(patterns=("nothing",)))
    os.utime(cache_copy.root / "blobs" / hex_digest, (0, 0))
    old = Pruner(store, orphan_age=600).prune(Selection(patterns=("nothing",)))

    assert young.blobs == {}
    assert old.blobs == {hex_digest: len(orphan)}


def test_blobs_in_use_include_downloads_still_being_read(tmp_path):
    downloads = Downloads(Store(str(tmp_path)), UpstreamClient(Settings()), 1.0)
    download = Download("ab" * 32, Repository("127.0.0.2", "x"), downloads.store)
    downloads.active[download.hex] = downloads._served[download.hex] = download

    downloads.active.pop(download.hex)
    is_read = downloads.is_in_use(download.hex)
    del download
    gc.collect()

    assert is_read
    assert not downloads.is_in_use("ab" * 32)


# -- prunes racing pulls -------------------------------------------------------


def fetch_blob(pool, url: str, digest: str) -> tuple[int, str]:
    """GET a blob; return its status and what was wrong with it, if anything."""
    try:
        response = pool.request("GET", url)
    except Exception as error:  # a cut connection is the failure we look for
        return -1, f"request failed: {error!r}"
    if response.status == 404:
        code = json.loads(response.data)["errors"][0]["code"]
        return 404, "" if code == "BLOB_UNKNOWN" else f"404 with code {code}"
    if response.status != 200:
        return response.status, f"status {response.status}"
    length = int(response.headers["Content-Length"])
    if len(response.data) != length:
        return 200, f"truncated: {len(response.data)} of {length} bytes"
    actual = "sha256:" + hashlib.sha256(response.data).hexdigest()
    return 200, "" if actual == digest else "digest mismatch"


def pull_outcomes(
    pool, server, cache, name: str, on_manifest=lambda: None
) -> list[tuple[int, str]]:
    """Pull an image once; return (status, problem) for the manifest and blobs."""
    repo, _, tag = name.rpartition(":")
    prefix = f"{server.url}/v2/{cache.namespace}/{repo}"
    try:
        response = pool.request("GET", f"{prefix}/manifests/{tag}")
    except Exception as error:
        return [(-1, f"manifest request failed: {error!r}")]
    if response.status != 200:
        problem = "" if response.status == 404 else f"manifest {response.status}"
        return [(response.status, problem)]
    manifest = json.loads(response.data)
    on_manifest()
    outcomes = [(200, "")]
    for descriptor in [manifest["config"], *manifest["layers"]]:
        digest = descriptor["digest"]
        outcomes.append(fetch_blob(pool, f"{prefix}/blobs/{digest}", digest))
    return outcomes


@pytest.mark.parametrize("air_gapped", [False, True], ids=["online", "air-gapped"])
def test_prune_racing_ten_clients_never_cuts_a_blob_short(
    cache_copy, oci_server, air_gapped
):
    args = ["--air-gapped"] if air_gapped else []
    server = oci_server(*args, image_path=cache_copy.root, config=cache_copy.config())
    outcomes: Counter[int] = Counter()
    problems: list[str] = []
    prune_reports: list[str] = []
    clients_done, has_manifest = threading.Event(), threading.Event()
    lock = threading.Lock()

    def client() -> None:
        pool = server.client(timeout=60)
        for _ in range(ROUNDS):
            results = pull_outcomes(
                pool, server, cache_copy, "big/layer:1", has_manifest.set
            )
            with lock:
                outcomes.update(status for status, _ in results)
                problems.extend(problem for _, problem in results if problem)

    def prune_until_clients_are_done() -> None:
        pool = server.client(timeout=60)
        url = f"{server.url}/cmd/prune?type=pattern&expr=big/layer&count=-1"
        has_manifest.wait(60)
        for _ in range(MAX_PRUNES):
            if clients_done.is_set():
                return
            prune_reports.append(pool.request("DELETE", url).data.decode())

    pruner = threading.Thread(target=prune_until_clients_are_done)
    clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
    pruner.start()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    clients_done.set()
    pruner.join(60)

    assert problems == []
    assert set(outcomes) <= {200, 404}
    assert outcomes[200] > 0
    assert any(report.startswith("manifest ") for report in prune_reports)


def test_clients_mid_download_get_the_whole_layer_when_it_is_pruned(
    cache_copy, oci_server
):
    server = oci_server("--air-gapped", image_path=cache_copy.root)
    layer = cache_copy.image("big/layer:1").layers[0]
    url = f"{server.url}/v2/{cache_copy.namespace}/big/layer/blobs/{layer.digest}"
    started = threading.Barrier(CLIENTS + 1, timeout=60)
    pruned = threading.Barrier(CLIENTS + 1, timeout=60)
    bodies: list[bytes] = []

    def client() -> None:
        response = server.client(timeout=60).request("GET", url, preload_content=False)
        first = response.read(64 * 1024)
        started.wait()
        pruned.wait()
        bodies.append(first + response.read())

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    started.wait()
    report = server.client().request(
        "DELETE", f"{server.url}/cmd/prune?type=pattern&expr=big/layer"
    )
    pruned.wait()
    for thread in threads:
        thread.join(60)

    assert f"blob {layer.digest} {layer.size}" in report.data.decode().splitlines()
    assert layer.digest not in cache_copy.blob_names()
    assert len(bodies) == CLIENTS
    assert all(body == layer.data for body in bodies)
    assert server.client().request("GET", url).status == 404

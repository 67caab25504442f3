"""Background pruning on the pruneConfig schedule, in a running server."""

from __future__ import annotations

import re

from support.processes import wait_until

pytest_plugins = ["support.cache_fill"]

OLD = "2020-01-01T00:00:00"
TIMEOUT = 20.0


def start_pruning_server(oci_server, cache, **prune):
    """Start an air-gapped server that prunes every second."""
    prune_config = {"enabled": True, "frequency": "1s", "count": -1, **prune}
    config = cache.config(pruneConfig=prune_config)
    return oci_server("--air-gapped", image_path=cache.root, config=config)


def runs_logged(server, text: str) -> int:
    """Count the background prune summaries that contain `text`."""
    return sum(
        text in line
        for line in server.read_log().splitlines()
        if "background prune: " in line
    )


def wait_for_runs(server, text: str, count: int) -> None:
    """Wait until `count` background prune summaries contain `text`."""
    wait_until(
        lambda: runs_logged(server, text) >= count, TIMEOUT, f"prune runs {text!r}"
    )


def test_background_pruning_removes_what_is_due_and_nothing_else(
    cache_copy, oci_server
):
    one = cache_copy.image("app/one:1")
    index = cache_copy.content["multi/arch:1.0"]
    child = cache_copy.image("multi/arch:1.0")
    cache_copy.set_stamps(one.digest, created=OLD)
    cache_copy.set_stamps(index.digest, created=OLD)
    manifests, blobs = cache_copy.manifest_digests(), cache_copy.blob_names()

    server = start_pruning_server(
        oci_server, cache_copy, type="created", duration="30d"
    )
    wait_until(
        lambda: one.digest not in cache_copy.manifest_digests(),
        TIMEOUT,
        "old image pruned",
    )
    wait_for_runs(server, "removed 0 manifests", 1)

    assert cache_copy.manifest_digests() == manifests - {
        one.digest,
        index.digest,
        child.digest,
    }
    gone = {one.config.digest, one.layers[1].digest, *(b.digest for b in child.blobs)}
    assert cache_copy.blob_names() == blobs - gone
    assert re.search(
        r"INFO\[\d+\] background prune: removed 3 manifests and 5 blobs "
        r"\(\d+\.\d\d MB\) in \d+\.\d\ds",
        server.read_log(),
    )
    assert server.stop() == 0


def test_background_pruning_by_access_time_spares_recent_pulls(cache_copy, oci_server):
    other = cache_copy.image("other/img:latest")
    cache_copy.set_stamps(other.digest, pulled=OLD)
    manifests = cache_copy.manifest_digests()

    server = start_pruning_server(
        oci_server, cache_copy, type="accessed", duration="1h"
    )
    wait_for_runs(server, "removed 1 manifests and 2 blobs", 1)
    wait_for_runs(server, "removed 0 manifests", 1)

    assert cache_copy.manifest_digests() == manifests - {other.digest}


def test_background_pruning_count_bounds_each_run(cache_copy, oci_server):
    one, two = cache_copy.image("app/one:1"), cache_copy.image("app/two:1")
    cache_copy.set_stamps(one.digest, created="2020-02-01T00:00:00")
    cache_copy.set_stamps(two.digest, created=OLD)

    server = start_pruning_server(
        oci_server, cache_copy, type="created", duration="1d", count=1
    )
    wait_for_runs(server, "removed 1 manifests", 2)

    log = server.read_log()
    assert log.index(f"manifest {cache_copy.url('app/two:1')}") < log.index(
        f"manifest {cache_copy.url('app/one:1')}"
    )
    assert not {one.digest, two.digest} & cache_copy.manifest_digests()


def test_background_dry_run_logs_what_it_would_remove_and_removes_nothing(
    cache_copy, oci_server
):
    one = cache_copy.image("app/one:1")
    cache_copy.set_stamps(one.digest, created=OLD)
    manifests, blobs = cache_copy.manifest_digests(), cache_copy.blob_names()

    server = start_pruning_server(
        oci_server, cache_copy, type="created", duration="30d", dryRun=True
    )
    wait_for_runs(server, "dry run: would remove 1 manifests and 2 blobs", 2)

    assert f"background prune: manifest {cache_copy.url('app/one:1')}" in (
        server.read_log()
    )
    assert cache_copy.manifest_digests() == manifests
    assert cache_copy.blob_names() == blobs

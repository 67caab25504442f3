"""The benchmark's scenarios; each is bounded in seconds and returns figures."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gevent
from gevent.event import Event
from support.upstream import RegistryUpstream

from bench.client import ACCEPT, Connection, Puller, PullError, PullStats, Target
from bench.imageset import BigImage
from bench.servers import cpu_seconds, peak_rss_mb, process_tree, reset_peak_rss

Figures = dict[str, float]
LAND_POLL = 0.005
LAND_GRACE = 5.0  # seconds the layer may take to land after the pull
MAX_PULLS_PER_CLIENT = 1_000_000


@dataclass
class Subject:
    """A server under test: how to reach it, its pid, where it keeps blobs."""

    name: str
    target: Target
    pid: int
    blob_file: Callable[[str], Path]  # hex digest → path once cached

    def pids(self) -> list[int]:
        """Return the server's pid and its children's (forked workers)."""
        return process_tree(self.pid)


def split(name: str) -> tuple[str, str]:
    """Split `repo:tag`."""
    repo, _, tag = name.rpartition(":")
    return repo, tag


def pull_all(target: Target, names: Sequence[str], concurrency: int) -> float:
    """Pull every image once with `concurrency` clients; return the wall time."""
    puller = Puller(target)
    pending = iter(names)

    def client() -> None:
        connection = target.connect()
        try:
            for name in pending:
                puller.pull(connection, *split(name))
        finally:
            connection.close()

    started = time.perf_counter()
    workers = [gevent.spawn(client) for _ in range(concurrency)]
    gevent.joinall(workers, raise_error=True)
    return time.perf_counter() - started


def warm_pulls(
    subject: Subject, names: Sequence[str], clients: int, duration: float
) -> Figures:
    """Pull images over and over from `clients` clients for `duration` s."""
    puller = Puller(subject.target)
    cycle = itertools.cycle(names)
    latencies: list[float] = []
    requests = [0]
    pids = subject.pids()
    reset_peak_rss(pids)
    cpu_before = cpu_seconds(pids)
    client_before = client_cpu_seconds()
    deadline = time.perf_counter() + duration

    def client() -> None:
        connection = subject.target.connect()
        try:
            for _ in range(MAX_PULLS_PER_CLIENT):
                if time.perf_counter() >= deadline:
                    return
                stats = puller.pull(connection, *split(next(cycle)))
                latencies.append(stats.seconds)
                requests[0] += stats.requests
        finally:
            connection.close()

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(client) for _ in range(clients)], raise_error=True)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pids) - cpu_before
    client_cpu = client_cpu_seconds() - client_before
    latencies.sort()
    return {
        "warm_images_per_s": len(latencies) / elapsed,
        "warm_requests_per_s": requests[0] / elapsed,
        "warm_p50_ms": 1000 * percentile(latencies, 0.50),
        "warm_p99_ms": 1000 * percentile(latencies, 0.99),
        "warm_cpu_per_1000": 1000 * cpu / max(len(latencies), 1),
        "warm_peak_rss_mb": peak_rss_mb(pids),
        "warm_server_cpu_use": cpu / elapsed,
        "warm_server_processes": len(pids),
        "warm_client_cpu_use": client_cpu / elapsed,
    }


def client_cpu_seconds() -> float:
    """Return the CPU seconds this process (the load generator) has used."""
    times = os.times()
    return times.user + times.system


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the value at a fraction of a sorted list (nearest rank)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(fraction * len(values)))]


def manifest_rates(
    target: Target, name: str, digest: str, clients: int, duration: float, cpus: str
) -> Figures:
    """Measure requests/s of HEAD and GET of a manifest by tag and by digest."""
    repo, tag = split(name)
    figures = {}
    for method in ("HEAD", "GET"):
        for kind, reference in (("tag", tag), ("digest", digest)):
            path = target.manifest_path(repo, reference)
            rate = request_rate(target, method, path, clients, duration, cpus)
            figures[f"manifest_{method.lower()}_{kind}_rps"] = rate
    return figures


def request_rate(
    target: Target, method: str, path: str, clients: int, duration: float, cpus: str
) -> float:
    """Return requests/s of one request, by `hey` when installed, else our client."""
    if shutil.which("hey"):
        return hey_rate(target, method, path, clients, duration, cpus)
    return client_rate(target, method, path, clients, duration)


HEY_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
HEY_STATUS = re.compile(r"\[(\d{3})\]\s+(\d+) responses")


def hey_rate(
    target: Target, method: str, path: str, clients: int, duration: float, cpus: str
) -> float:
    """Run `hey` on the client CPUs; raise PullError on any status but 200."""
    pin = ["taskset", "-c", cpus] if cpus else []
    url = f"http://{target.host}:{target.port}{path}"
    argv = [*pin, "hey", "-z", f"{duration}s", "-c", str(clients), "-m", method]
    argv += ["-H", f"Accept: {ACCEPT}", url]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, check=True
    )
    statuses = {code: int(count) for code, count in HEY_STATUS.findall(result.stdout)}
    if set(statuses) != {"200"}:
        raise PullError(f"{method} {path}: statuses {statuses}\n{result.stdout}")
    match = HEY_RATE.search(result.stdout)
    if match is None:
        raise PullError(f"hey printed no rate:\n{result.stdout}")
    return float(match.group(1))


def client_rate(
    target: Target, method: str, path: str, clients: int, duration: float
) -> float:
    """Return requests/s of one request sent by `clients` of our clients."""
    count = [0]
    deadline = time.perf_counter() + duration

    def client() -> None:
        connection = target.connect()
        try:
            for _ in range(MAX_PULLS_PER_CLIENT):
                if time.perf_counter() >= deadline:
                    return
                response = connection.request(method, path, {"Accept": ACCEPT})
                if response.status != 200:
                    raise PullError(f"{method} {path}: HTTP {response.status}")
                count[0] += 1
        finally:
            connection.close()

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(client) for _ in range(clients)], raise_error=True)
    return count[0] / (time.perf_counter() - started)


def herd(
    target: Target, upstream: RegistryUpstream, name: str, clients: int
) -> Figures:
    """Pull one un-cached image from `clients` at once; count upstream GETs."""
    before = upstream.request_counts()
    start = Event()
    puller = Puller(target)

    def client() -> None:
        connection = target.connect()
        try:
            start.wait()
            puller.pull(connection, *split(name))
        finally:
            connection.close()

    workers = [gevent.spawn(client) for _ in range(clients)]
    gevent.sleep(0)
    start.set()
    gevent.joinall(workers, raise_error=True)
    after = upstream.request_counts()
    repo = split(name)[0]
    per_blob = Counter(
        {
            path: count - before[(method, path)]
            for (method, path), count in after.items()
            if method == "GET" and path.startswith(f"/v2/{repo}/blobs/")
        }
    )
    return {"herd_upstream_gets_per_blob": max(per_blob.values(), default=0)}


def big_cold(subject: Subject, image: BigImage) -> Figures:
    """Pull the big image un-cached; time the first layer byte and the landing."""
    marks: dict[str, float] = {}
    landed_path = subject.blob_file(image.layer_hex)
    started = time.perf_counter()

    def watch_disk() -> None:
        for _ in range(int(120 / LAND_POLL)):
            if landed_path.exists():
                marks["landed"] = time.perf_counter() - started
                return
            gevent.sleep(LAND_POLL)

    def first_byte() -> None:
        marks.setdefault("first_byte", time.perf_counter() - started)

    watcher = gevent.spawn(watch_disk)
    connection = subject.target.connect(timeout=120.0)
    try:
        pull_big(connection, subject.target, image, first_byte)
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
        watcher.join(timeout=LAND_GRACE)
        watcher.kill()
    figures = {
        "big_cold_s": elapsed,
        "big_cold_mbps": image.layer_size / 1e6 / elapsed,
        "big_cold_first_byte_s": marks.get("first_byte", float("nan")),
    }
    if "landed" in marks:
        figures["big_cold_landed_s"] = marks["landed"]
        figures["big_first_byte_before_disk"] = float(
            marks["first_byte"] < marks["landed"]
        )
    return figures


def pull_big(
    connection: Connection,
    target: Target,
    image: BigImage,
    on_first_byte: Callable[[], None],
) -> None:
    """Run the client sequence for the big image, hashing the layer as it comes."""
    puller = Puller(target)
    head = connection.request(
        "HEAD", target.manifest_path(image.repo, image.tag), {"Accept": ACCEPT}
    )
    if head.status != 200:
        raise PullError(f"HEAD big image: HTTP {head.status}")
    digest = head.headers["docker-content-digest"]
    manifest = puller.get_manifest(connection, image.repo, digest, PullStats())
    puller.get_blob(connection, image.repo, manifest["config"], PullStats())
    hasher = hashlib.sha256()
    path = target.blob_path(image.repo, image.layer_digest)
    size = connection.stream(path, hasher.update, on_first_byte)
    if size != image.layer_size or f"sha256:{hasher.hexdigest()}" != image.layer_digest:
        raise PullError("big layer: wrong size or digest")


def big_warm(target: Target, image: BigImage, count: int) -> Figures:
    """GET the cached big layer `count` times in a row; return median MB/s."""
    path = target.blob_path(image.repo, image.layer_digest)
    rates = []
    for _ in range(count):
        connection = target.connect(timeout=120.0)
        try:
            started = time.perf_counter()
            size = connection.stream(path)
            rates.append(size / 1e6 / (time.perf_counter() - started))
        finally:
            connection.close()
    return {"big_warm_mbps": statistics.median(rates)}


def big_parallel(subject: Subject, image: BigImage, clients: int) -> Figures:
    """Stream the cached big layer to `clients` at once; peak RSS and MB/s."""
    path = subject.target.blob_path(image.repo, image.layer_digest)
    pids = subject.pids()
    reset_peak_rss(pids)

    def client() -> int:
        connection = subject.target.connect(timeout=120.0)
        try:
            return connection.stream(path)
        finally:
            connection.close()

    started = time.perf_counter()
    workers = [gevent.spawn(client) for _ in range(clients)]
    gevent.joinall(workers, raise_error=True)
    elapsed = time.perf_counter() - started
    total = sum(worker.value for worker in workers)
    if total != clients * image.layer_size:
        raise PullError(f"parallel big GETs received {total} bytes")
    return {
        "big_parallel_peak_rss_mb": peak_rss_mb(pids),
        "big_parallel_mbps": total / 1e6 / elapsed,
    }


def our_blob_file(root: Path) -> Callable[[str], Path]:
    """Return the blob path function of our cache root."""
    return lambda hex_digest: root / "blobs" / hex_digest


def anchor_blob_file(storage: Path) -> Callable[[str], Path]:
    """Return the blob path function of docker-registry's filesystem storage."""
    base = storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return lambda hex_digest: base / hex_digest[:2] / hex_digest / "data"


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)

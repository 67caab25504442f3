"""The `list` command, on a cache filled through a real upstream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.processes import REPO_ROOT

from ociregistry.listing import HEADER

pytest_plugins = ["support.cache_fill"]


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `ociregistry --image-path root ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "ociregistry", "--image-path", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def stamps(cache, digest: str) -> tuple[str, str]:
    """Return the created and pulled stamps of a manifest's record."""
    record = cache.record(digest)
    return record["created"], record["pulled"]


def expected_row(cache, name: str, reference: str, digest: str) -> str:
    """Return the line `list` prints for one cached image manifest."""
    image = cache.image(name)
    created, pulled = stamps(cache, digest)
    megabytes = sum(layer.size for layer in image.layers) / 1_000_000
    repo = name.rpartition(":")[0]
    return f"{cache.url(repo)} {reference} image {created} {pulled} {megabytes:.2f}"


def test_list_prints_one_line_per_cached_manifest(cache_copy):
    index = cache_copy.content["multi/arch:1.0"]
    child = cache_copy.image("multi/arch:1.0")

    result = run_cli(cache_copy.root, "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    created, pulled = stamps(cache_copy, index.digest)
    assert f"{cache_copy.url('multi/arch')} 1.0 list {created} {pulled} n/a" in lines
    assert (
        expected_row(cache_copy, "multi/arch:1.0", child.digest, child.digest) in lines
    )
    one = cache_copy.image("app/one:1")
    assert expected_row(cache_copy, "app/one:1", "1", one.digest) in lines
    latest = cache_copy.image("other/img:latest")
    assert (
        expected_row(cache_copy, "other/img:latest", "latest", latest.digest) in lines
    )
    assert len(lines) == 6  # five tags, plus the image of the index


def test_list_header_comes_first(cache_copy):
    result = run_cli(cache_copy.root, "list", "--header")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == HEADER
    assert len(lines) == 7


def test_list_patterns_select_matching_image_urls(cache_copy):
    result = run_cli(cache_copy.root, "list", "--pattern", "app/one,other/img:l")

    assert result.returncode == 0, result.stderr
    images = [line.split()[0] for line in result.stdout.splitlines()]
    assert images == [cache_copy.url("app/one"), cache_copy.url("other/img")]


def test_list_pattern_matching_nothing_prints_nothing(cache_copy):
    result = run_cli(cache_copy.root, "list", "--pattern", "no-such-image")

    assert result.returncode == 0
    assert result.stdout == ""


def test_list_short_digest_shows_twelve_hex_digits(cache_copy):
    child = cache_copy.image("multi/arch:1.0")

    result = run_cli(cache_copy.root, "list", "--short-digest", "--pattern", "multi")

    assert result.returncode == 0, result.stderr
    references = [line.split()[1] for line in result.stdout.splitlines()]
    assert references == ["1.0", child.digest[7:19]]


def test_list_output_is_sorted_and_stable(cache_copy):
    first = run_cli(cache_copy.root, "list").stdout

    second = run_cli(cache_copy.root, "list").stdout

    assert first == second
    assert first.splitlines() == sorted(first.splitlines())


def test_list_changes_nothing_in_the_cache_root(cache_copy):
    before = cache_copy.tree_state()

    result = run_cli(cache_copy.root, "list", "--header")

    assert result.returncode == 0, result.stderr
    assert cache_copy.tree_state() == before
    assert not (cache_copy.root / ".locks").exists()


def test_list_reads_a_cache_root_a_server_is_running_on(cache_copy, oci_server):
    server = oci_server("--air-gapped", image_path=cache_copy.root)

    result = run_cli(cache_copy.root, "list", "--pattern", "app/")

    assert server.is_running()
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_list_of_a_missing_cache_root_is_one_line_and_status_1(tmp_path):
    result = run_cli(tmp_path / "nowhere", "list")

    assert result.returncode == 1
    assert (
        result.stderr
        == f"ociregistry: cache root {tmp_path / 'nowhere'} does not exist\n"
    )
    assert not (tmp_path / "nowhere").exists()


def test_list_bad_pattern_is_one_line_and_status_1(cache_copy):
    result = run_cli(cache_copy.root, "list", "--pattern", "a(b")

    assert result.returncode == 1
    assert result.stderr.startswith(
        'ociregistry: --pattern: bad regular expression "a(b"'
    )
    assert len(result.stderr.splitlines()) == 1

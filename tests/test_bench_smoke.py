"""A smoke run of the benchmark: tiny image set, one repetition, a few seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import REPO_ROOT
from support.upstream import registry_binary

BENCH = REPO_ROOT / "tests" / "bench" / "bench.py"


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a smoke benchmark with our server from the source tree."""
    if registry_binary() is None or shutil.which("taskset") is None:
        pytest.skip("the benchmark needs docker-registry and taskset")
    command = [sys.executable, str(BENCH), "--smoke", *args]
    command += ["--ours-command", f"{sys.executable} -m ociregistry"]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


@pytest.mark.slow
def test_bench_smoke_run_measures_both_servers(tmp_path: Path) -> None:
    results = tmp_path / "results.json"

    finished = run_bench(tmp_path, "--json", str(results))

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "warm image pulls" in finished.stdout
    report = json.loads(results.read_text())
    rows = {row["key"]: row for row in report["rows"]}
    assert rows["cold_set_s"]["anchor"] > 0 and rows["cold_set_s"]["ours"] > 0
    assert rows["warm_images_per_s"]["ours"] > 0
    assert rows["herd_upstream_gets_per_blob"]["ours"] == 1
    assert rows["startup_s"]["ours"] > 0


@pytest.mark.slow
def test_bench_smoke_run_with_two_workers_serves_and_pulls_once(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.json"

    finished = run_bench(
        tmp_path,
        "--workers",
        "2",
        "--servers",
        "ours",
        "--only",
        "herd,warm",
        "--json",
        str(results),
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    ours = json.loads(results.read_text())["medians"]["ours"]
    assert ours["warm_server_processes"] == 2
    assert ours["warm_images_per_s"] > 0
    assert ours["herd_upstream_gets_per_blob"] == 1

"""The command line: help, version, parsing, errors, dispatch to commands."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ociregistry
from ociregistry import cli
from ociregistry.config import Settings

SERVE_FLAGS = [
    "--preload-images",
    "--port",
    "--os",
    "--arch",
    "--pull-timeout",
    "--health",
    "--metrics",
    "--always-pull-latest",
    "--hello-world",
    "--air-gapped",
    "--default-ns",
    "--host",
]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m ociregistry ARGS` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "ociregistry", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_failure(done: subprocess.CompletedProcess[str], text: str) -> None:
    """Assert exit 1 with a single `ociregistry: …` line on stderr."""
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("ociregistry: ")
    assert done.stderr.count("\n") == 1
    assert text in done.stderr
    assert "Traceback" not in done.stderr


def test_no_arguments_prints_help() -> None:
    done = run_cli()

    assert done.returncode == 0
    assert "ociregistry [global options] command [command options]" in done.stdout
    for command in ("serve", "load", "list", "prune", "version", "help, h"):
        assert f"  {command}  " in done.stdout
    for flag in ("--log-level", "--config-file", "--image-path", "--log-file"):
        assert flag in done.stdout


def test_version_prints_version_and_build_date() -> None:
    done = run_cli("version")

    assert done.returncode == 0
    assert done.stdout == (
        f"Version: {ociregistry.__version__}, build date: {ociregistry.build_date()}\n"
    )


def test_serve_help_lists_every_serve_flag() -> None:
    done = run_cli("serve", "--help")

    assert done.returncode == 0
    assert done.stdout.startswith("Usage: ociregistry [global options] serve")
    for flag in SERVE_FLAGS:
        assert f"  {flag} " in done.stdout


def test_bad_log_level_is_one_line() -> None:
    done = run_cli("--log-level", "loud", "serve")

    assert_one_line_failure(done, "--log-level: must be one of debug, info, warn")


def test_missing_config_file_is_one_line() -> None:
    done = run_cli("--config-file", "/nonexistent", "serve")

    assert_one_line_failure(done, "config file /nonexistent: no such file")


def test_config_file_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    done = run_cli("--config-file", str(tmp_path), "serve")

    assert_one_line_failure(done, f"config file {tmp_path}: is a directory")


def test_bad_config_value_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("pruneConfig:\n  duration: 3x\n")

    done = run_cli("--config-file", str(config), "serve")

    assert_one_line_failure(done, 'pruneConfig.duration: bad duration "3x"')


def test_unknown_flag_is_one_line() -> None:
    done = run_cli("serve", "--colour", "blue")

    assert_one_line_failure(done, "unknown option --colour for serve")


def test_non_numeric_port_is_one_line() -> None:
    done = run_cli("serve", "--port", "eighty")

    assert_one_line_failure(done, '--port: expected a number, got "eighty"')


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--colour", "serve"], "unknown option --colour (see ociregistry --help)"),
        (["serve", "--log-level", "info"], "--log-level is a global option"),
        (["serve", "--port"], "--port requires argument"),
        (["serve", "now"], "unexpected arguments for serve: now"),
        (["fly"], 'unknown command "fly"'),
        (["help", "fly"], 'no help for unknown command "fly"'),
        (["--image-path", "/tmp", "load"], "load needs --image-file"),
        (["list", "--pattern", "a,("], '--pattern: bad regular expression "("'),
        (["prune", "--date", "2024-02-30T00:00:00"], "--date: expected"),
        (["serve", "--health", "70000"], "--health: must be a port from 1 to 65535"),
    ],
)
def test_bad_arguments_end_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status = cli.run(argv)

    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.startswith("ociregistry: ")
    assert captured.err.count("\n") == 1
    assert message in captured.err


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["help"], "OCI Registry: pull-only"),
        (["h"], "OCI Registry: pull-only"),
        (["--help"], "OCI Registry: pull-only"),
        (["-h", "serve"], "OCI Registry: pull-only"),
        (["help", "serve"], "Usage: ociregistry [global options] serve"),
        (["h", "prune"], "Usage: ociregistry [global options] prune"),
        (["load", "--help"], "Usage: ociregistry [global options] load"),
        (["list", "-h"], "Usage: ociregistry [global options] list"),
        (["version", "--help"], "Usage: ociregistry [global options] version"),
    ],
)
def test_help_is_printed(
    capsys: pytest.CaptureFixture[str], argv: list[str], start: str
) -> None:
    status = cli.run(argv)

    assert status == 0
    assert capsys.readouterr().out.startswith(start)


class Recorder:
    """Stand in for a command's entry point; remember what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> int:
        self.calls.append(args)
        return 0

    @property
    def settings(self) -> Settings:
        """Return the settings of the only call."""
        assert len(self.calls) == 1
        settings: Settings = self.calls[0][0]
        return settings


@pytest.fixture
def recorder() -> Recorder:
    """A fresh recorder."""
    return Recorder()


def test_serve_gets_merged_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recorder: Recorder
) -> None:
    from ociregistry import server

    config = tmp_path / "config.yaml"
    config.write_text("port: 9000\nhost: 127.0.0.2\ndefaultNs: docker.io\n")
    monkeypatch.setattr(server, "serve", recorder)
    argv = ["--config-file", str(config), "--log-level", "info", "serve"]
    argv += ["--port", "9001", "--pull-timeout", "1500", "--air-gapped"]

    status = cli.run(argv)

    settings = recorder.settings
    assert status == 0
    assert (settings.port, settings.host, settings.default_ns) == (
        9001,
        "127.0.0.2",
        "docker.io",
    )
    assert (settings.log_level, settings.pull_timeout, settings.air_gapped) == (
        "info",
        1.5,
        True,
    )
    assert settings.config_file == str(config)
    assert settings.command_line.endswith(" ".join(argv))


def test_load_gets_its_options(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    from ociregistry import loader

    monkeypatch.setattr(loader, "run_load", recorder)
    argv = ["--image-path", "/tmp/x", "load", "--image-file", "a.txt,b.tar"]
    argv += ["--resolve-ref", "docker.io/app:1", "--os", "linux", "--arch", "arm64"]

    status = cli.run(argv)

    settings = recorder.settings
    assert status == 0
    assert (settings.image_path, settings.image_file, settings.resolve_ref) == (
        "/tmp/x",
        "a.txt,b.tar",
        "docker.io/app:1",
    )
    assert (settings.os, settings.arch) == ("linux", "arm64")


def test_list_gets_its_options(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    from ociregistry import listing

    monkeypatch.setattr(listing, "run_list", recorder)

    status = cli.run(
        ["list", "--header", "--pattern", "pause, kube-.*", "--short-digest"]
    )

    assert status == 0
    assert recorder.calls[0][1:] == (True, ["pause", "kube-.*"], True)


def test_list_options_default_to_off(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    from ociregistry import listing

    monkeypatch.setattr(listing, "run_list", recorder)

    cli.run(["list"])

    assert recorder.calls[0][1:] == (False, [], False)


def test_prune_gets_its_options(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    from ociregistry import prune

    monkeypatch.setattr(prune, "run_prune", recorder)
    argv = ["prune", "--pattern", "pause", "--date", "2025-01-02T03:04:05"]

    status = cli.run([*argv, "--dry-run"])

    assert status == 0
    date = datetime.datetime(2025, 1, 2, 3, 4, 5)
    assert recorder.calls[0][1:] == (["pause"], date, True)


def test_command_status_is_the_exit_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ociregistry import listing

    monkeypatch.setattr(listing, "run_list", lambda *args: 3)

    assert cli.run(["list"]) == 3

"""Logging: the `INFO[0007] message` shape, levels, console or file."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ociregistry.errors import ConfigError
from ociregistry.logs import ROOT_LOGGER, ElapsedFormatter, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the package logger back as it was after each test."""
    logger = logging.getLogger(ROOT_LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler not in saved[0]:
            handler.close()
    for handler in saved[0]:
        logger.addHandler(handler)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def make_record(level: int, message: str, seconds: float) -> logging.LogRecord:
    """Make a record logged `seconds` after start."""
    record = logging.LogRecord("ociregistry.x", level, __file__, 1, message, (), None)
    record.relativeCreated = seconds * 1000
    return record


@pytest.mark.parametrize(
    ("level", "seconds", "line"),
    [
        (logging.DEBUG, 0.2, "DEBU[0000] pulled"),
        (logging.INFO, 7.9, "INFO[0007] pulled"),
        (logging.WARNING, 294, "WARN[0294] pulled"),
        (logging.ERROR, 12345, "ERRO[12345] pulled"),
        (logging.CRITICAL, 1, "FATA[0001] pulled"),
    ],
)
def test_line_has_the_original_shape(level: int, seconds: float, line: str) -> None:
    record = make_record(level, "pulled", seconds)

    assert ElapsedFormatter().format(record) == line


def test_message_arguments_are_applied() -> None:
    record = make_record(logging.INFO, "serving manifest from cache: %r", 0)
    record.args = ("registry.k8s.io/pause:3.8",)

    line = ElapsedFormatter().format(record)

    assert line == "INFO[0000] serving manifest from cache: 'registry.k8s.io/pause:3.8'"


def test_traceback_follows_the_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = make_record(logging.ERROR, "request failed", 0)
        record.exc_info = sys.exc_info()

    text = ElapsedFormatter().format(record)

    assert text.startswith("ERRO[0000] request failed\nTraceback")
    assert "ValueError: boom" in text


def test_file_gets_lines_at_and_above_the_level(tmp_path: Path) -> None:
    log_file = tmp_path / "ociregistry.log"
    setup_logging("warn", str(log_file))
    logger = logging.getLogger("ociregistry.test")

    logger.info("not shown")
    logger.warning("upstream slow: %r", "quay.io")
    logger.error("request failed")

    lines = log_file.read_text().splitlines()
    assert [line[:5] for line in lines] == ["WARN[", "ERRO["]
    assert lines[0].endswith("] upstream slow: 'quay.io'")


def test_console_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")

    logging.getLogger("ociregistry.server").info("server is running")

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("] server is running\n")
    assert captured.err.startswith("INFO[")


def test_default_level_is_error(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()

    logging.getLogger("ociregistry.x").warning("hidden")
    logging.getLogger("ociregistry.x").error("shown")

    assert "hidden" not in capsys.readouterr().err


def test_setting_up_again_replaces_the_handler(tmp_path: Path) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    setup_logging("info", str(first))
    setup_logging("info", str(second))

    logging.getLogger("ociregistry.x").info("once")

    assert first.read_text() == ""
    assert second.read_text().count("once") == 1


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ConfigError, match='got "loud"'):
        setup_logging("loud")


def test_unwritable_log_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"log file {tmp_path}: Is a directory"):
        setup_logging("info", str(tmp_path))

"""Logging in the original's shape: `INFO[0007] message` on stderr or a file."""

from __future__ import annotations

import logging
import sys

from ociregistry.errors import ConfigError

# Every module logs under this name: logging.getLogger(__name__).
ROOT_LOGGER = "ociregistry"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_LABELS = {
    logging.DEBUG: "DEBU",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERRO",
    logging.CRITICAL: "FATA",
}


class ElapsedFormatter(logging.Formatter):
    """Format a record as level, seconds since start, message: `INFO[0007] …`."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line, plus a traceback when it has one."""
        label = _LABELS.get(record.levelno, record.levelname[:4].upper())
        seconds = int(record.relativeCreated // 1000)
        line = f"{label}[{seconds:04d}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "error", log_file: str = "") -> None:
    """Send the package's logs at `level` and above to stderr or `log_file`.

    Calling it again replaces the previous set-up. Raise ConfigError for an
    unknown level or a log file that cannot be opened.
    """
    if level not in LEVELS:
        choices = ", ".join(LEVELS)
        raise ConfigError(f'log level must be one of {choices}, got "{level}"')
    handler = _make_handler(log_file)
    handler.setFormatter(ElapsedFormatter())

    logger = logging.getLogger(ROOT_LOGGER)
    for previous in list(logger.handlers):
        logger.removeHandler(previous)
        previous.close()
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level])
    logger.propagate = False


def _make_handler(log_file: str) -> logging.Handler:
    if not log_file:
        return logging.StreamHandler(sys.stderr)
    try:
        return logging.FileHandler(log_file, encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"log file {log_file}: {error.strerror}") from None

"""The exception tree: every error a client or the CLI can see."""

from __future__ import annotations

import json


class RegistryError(Exception):
    """Raised when a request cannot be answered; carries status and OCI code."""

    status = 500
    code = "UNKNOWN"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def body(self) -> bytes:
        """Render the OCI error body for this error."""
        return self.body_for(self.code, self.message).encode()

    @staticmethod
    def body_for(code: str, message: str) -> str:
        """Render an OCI error body from a code and a message."""
        error = {"code": code, "message": message, "detail": None}
        return json.dumps({"errors": [error]})


class NameInvalid(RegistryError):
    """Raised when a repository name or namespace is malformed."""

    status = 400
    code = "NAME_INVALID"


class NameUnknown(RegistryError):
    """Raised when a repository is not known."""

    status = 404
    code = "NAME_UNKNOWN"


class DigestInvalid(RegistryError):
    """Raised when a digest is malformed, unsupported or does not match."""

    status = 400
    code = "DIGEST_INVALID"


class ManifestInvalid(RegistryError):
    """Raised when a manifest cannot be parsed or stored."""

    status = 400
    code = "MANIFEST_INVALID"


class ManifestUnknown(RegistryError):
    """Raised when a manifest is neither cached nor available upstream."""

    status = 404
    code = "MANIFEST_UNKNOWN"


class BlobUnknown(RegistryError):
    """Raised when a blob is neither cached nor available upstream."""

    status = 404
    code = "BLOB_UNKNOWN"


class RangeInvalid(RegistryError):
    """Raised when a Range header cannot be satisfied."""

    status = 416
    code = "RANGE_INVALID"


class Unsupported(RegistryError):
    """Raised for operations a pull-only registry does not offer."""

    status = 405
    code = "UNSUPPORTED"


class Denied(RegistryError):
    """Raised when access to an upstream or endpoint is not allowed."""

    status = 403
    code = "DENIED"


class Unauthorized(RegistryError):
    """Raised when a request lacks the credentials an endpoint requires."""

    status = 401
    code = "UNAUTHORIZED"


class BadRequest(RegistryError):
    """Raised when a query parameter or header is malformed."""

    status = 400
    code = "UNSUPPORTED"


class UpstreamError(RegistryError):
    """Raised when an upstream refuses, fails or answers badly (502)."""

    status = 502
    code = "UNKNOWN"

    def __init__(self, upstream: str, reason: str, status: int | None = None):
        super().__init__(f"upstream {upstream}: {reason}", status)
        self.upstream = upstream
        self.reason = reason


class UpstreamTimeout(UpstreamError):
    """Raised when an upstream does not answer within the pull timeout (504)."""

    status = 504


class CacheFull(RegistryError):
    """Raised when the cache root has no space left for a new entry (507)."""

    status = 507
    code = "UNKNOWN"


class ConfigError(Exception):
    """Raised when the command line or config file is invalid."""

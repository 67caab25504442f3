"""Credentials for upstreams: passwords, static tokens, credential helpers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass

from ociregistry.config import AuthSettings
from ociregistry.errors import UpstreamError

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0  # seconds a credential helper may take


@dataclass(frozen=True)
class Login:
    """A user name and secret to present to an upstream or its token service."""

    user: str
    secret: str

    def __repr__(self) -> str:
        return f"Login(user={self.user!r}, secret=<hidden>)"


class CredentialSource:
    """Hand out the credentials of one upstream, refreshing them as needed."""

    def __init__(self, upstream: str, auth: AuthSettings | None) -> None:
        self.upstream = upstream
        self.auth = auth
        self._helper_login: Login | None = None
        self._helper_expires = 0.0

    def static_token(self) -> str:
        """Return the configured static bearer token, or ""."""
        token = self.auth.token if self.auth else None
        return token.static if token else ""

    def login(self) -> Login | None:
        """Return the login for basic auth and the token exchange, if any."""
        if self.auth is None:
            return None
        token = self.auth.token
        if token is not None and token.provider == "helper":
            return self._login_from_helper()
        password = self.auth.password
        if self.auth.password_from_env:
            password = _env_password(self.auth.password_from_env)
        if self.auth.user or password:
            return Login(self.auth.user, password)
        return None

    def _login_from_helper(self) -> Login:
        assert self.auth is not None and self.auth.token is not None
        if self._helper_login is not None and time.monotonic() < self._helper_expires:
            return self._helper_login
        name = self.auth.token.provider_opts.get("name", "")
        self._helper_login = run_credential_helper(name, self.upstream)
        expiry = self.auth.token.expiry or 12 * 3600.0
        self._helper_expires = time.monotonic() + expiry
        log.info("refreshed credentials from helper: %r for %r", name, self.upstream)
        return self._helper_login


def _env_password(variable: str) -> str:
    return os.environ.get(variable, "")


def run_credential_helper(name: str, host: str) -> Login:
    """Ask `docker-credential-<name> get` for a host's login."""
    program = f"docker-credential-{name}"
    try:
        done = subprocess.run(
            [program, "get"],
            input=host.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UpstreamError(
            host, f"credential helper {program} failed: {error}"
        ) from None
    if done.returncode != 0:
        reason = done.stdout.decode(errors="replace").strip()[:200]
        raise UpstreamError(host, f"credential helper {program} failed: {reason}")
    try:
        answer = json.loads(done.stdout)
        return Login(str(answer["Username"]), str(answer["Secret"]))
    except (ValueError, KeyError, TypeError):
        raise UpstreamError(
            host, f"credential helper {program} gave no login"
        ) from None

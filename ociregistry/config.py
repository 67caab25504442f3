"""Typed settings: every setting of every command, with its default."""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field

MACHINES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm/v7",
    "armv6l": "arm/v6",
    "i386": "386",
    "i686": "386",
}


@dataclass
class TlsSettings:
    """How to verify, and authenticate to, one upstream over https."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    insecure_skip_verify: bool = False


@dataclass
class TokenSettings:
    """A bearer token for an upstream: static, or from a credential helper."""

    static: str = field(default="", repr=False)
    provider: str = ""
    provider_opts: dict[str, str] = field(default_factory=dict)
    expiry: float = 0.0  # seconds


@dataclass
class AuthSettings:
    """Credentials for one upstream."""

    user: str = ""
    password: str = field(default="", repr=False)
    password_from_env: str = ""
    token: TokenSettings | None = None

    def resolved_password(self) -> str:
        """Return the password, read from `passwordFromEnv` now when set."""
        if self.password_from_env:
            return os.environ.get(self.password_from_env, "")
        return self.password


@dataclass
class RegistrySettings:
    """One `registries` entry: how to talk to one upstream (or `*`)."""

    name: str
    scheme: str = "https"
    auth: AuthSettings | None = None
    tls: TlsSettings | None = None
    tag_ttl: float | None = None  # seconds; None: use the top-level default
    max_concurrent: int = 0  # 0: no limit


@dataclass
class PruneSettings:
    """The `pruneConfig` block: background pruning and the size quota."""

    enabled: bool = False
    duration: float = 0.0  # seconds
    type: str = "accessed"  # accessed | created
    frequency: float = 0.0  # seconds
    count: int = -1
    dry_run: bool = False
    max_bytes: int = 0  # 0: no quota


@dataclass
class ServerTlsSettings:
    """The `serverTlsConfig` block: serving https, optionally mTLS."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    client_auth: str = "none"  # none | verify


@dataclass
class AdminApiSettings:
    """The `adminApi` block: who may call the /cmd endpoints."""

    allowed_networks: list[str] = field(default_factory=list)
    token: str = field(default="", repr=False)


@dataclass
class Settings:
    """Every setting of every command, after file and command line merge."""

    # global
    log_level: str = "error"
    log_file: str = ""
    image_path: str = "/var/lib/ociregistry"
    config_file: str = ""
    command_line: str = ""

    # serve and load
    preload_images: str = ""
    image_file: str = ""
    resolve_ref: str = ""
    port: int = 8080
    host: str = "0.0.0.0"
    os: str = ""  # empty: this host's
    arch: str = ""  # empty: this host's
    pull_timeout: float = 60.0  # seconds (the flag is milliseconds)
    health: int = 0  # 0: off
    metrics: int = 0  # 0: off
    always_pull_latest: bool = False
    hello_world: bool = False
    air_gapped: bool = False
    default_ns: str = ""

    # file only
    registries: list[RegistrySettings] = field(default_factory=list)
    prune: PruneSettings = field(default_factory=PruneSettings)
    server_tls: ServerTlsSettings | None = None
    admin_api: AdminApiSettings = field(default_factory=AdminApiSettings)
    allowed_upstreams: list[str] = field(default_factory=list)
    tag_ttl: float = 0.0  # seconds; 0: never re-validate tags
    negative_ttl: float = 30.0  # seconds
    workers: int = 1

    def registry(self, upstream: str) -> RegistrySettings:
        """Return the entry for an upstream, else the `*` entry, else defaults."""
        wildcard = None
        for entry in self.registries:
            if entry.name == upstream:
                return entry
            if entry.name == "*":
                wildcard = entry
        if wildcard is not None:
            return dataclasses.replace(wildcard, name=upstream)

        # As the original: an upstream nobody configured gets https without
        # certificate verification. A `*` entry turns verification on.
        return RegistrySettings(
            name=upstream, tls=TlsSettings(insecure_skip_verify=True)
        )


def host_platform() -> tuple[str, str]:
    """Return this host's OS and architecture as image indexes name them."""
    machine = platform.machine().lower()
    return platform.system().lower() or "linux", MACHINES.get(machine, machine)


def with_host_platform(settings: Settings) -> Settings:
    """Return settings whose empty --os/--arch are this host's."""
    os_name, arch = host_platform()
    return dataclasses.replace(
        settings, os=settings.os or os_name, arch=settings.arch or arch
    )

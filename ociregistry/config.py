"""Typed settings, and reading them from the config file and command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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

    static: str = ""
    provider: str = ""
    provider_opts: dict[str, str] = field(default_factory=dict)
    expiry: float = 0.0  # seconds


@dataclass
class AuthSettings:
    """Credentials for one upstream."""

    user: str = ""
    password: str = ""
    password_from_env: str = ""
    token: TokenSettings | None = None


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
    token: str = ""


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

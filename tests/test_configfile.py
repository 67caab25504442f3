"""Reading settings: config file keys, durations, sizes, errors, precedence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ociregistry.config import AuthSettings, RegistrySettings, Settings, TlsSettings
from ociregistry.configfile import (
    load_settings,
    overrides_from_options,
    parse_duration,
    parse_size,
)
from ociregistry.errors import ConfigError


def write_config(tmp_path: Path, text: str) -> str:
    """Write a config file and return its path."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def first_registry(settings: Settings) -> RegistrySettings:
    """Return the first `registries` entry."""
    return settings.registries[0]


def first_auth(settings: Settings) -> AuthSettings:
    """Return the auth block of the first `registries` entry."""
    auth = first_registry(settings).auth
    assert auth is not None
    return auth


def first_tls(settings: Settings) -> TlsSettings:
    """Return the tls block of the first `registries` entry."""
    tls = first_registry(settings).tls
    assert tls is not None
    return tls


REGISTRY = "registries:\n  - name: quay.io\n"

KEYS: list[tuple[str, Callable[[Settings], Any], Any]] = [
    ("imagePath: /srv/cache", lambda s: s.image_path, "/srv/cache"),
    ("logLevel: debug", lambda s: s.log_level, "debug"),
    ("logFile: /tmp/x.log", lambda s: s.log_file, "/tmp/x.log"),
    ("preloadImages: /tmp/list.txt", lambda s: s.preload_images, "/tmp/list.txt"),
    ("imageFile: '*.tar'", lambda s: s.image_file, "*.tar"),
    ("port: 9000", lambda s: s.port, 9000),
    ("os: linux", lambda s: s.os, "linux"),
    ("arch: arm64", lambda s: s.arch, "arm64"),
    ("pullTimeout: 1500", lambda s: s.pull_timeout, 1.5),
    ("alwaysPullLatest: true", lambda s: s.always_pull_latest, True),
    ("airGapped: true", lambda s: s.air_gapped, True),
    ("helloWorld: true", lambda s: s.hello_world, True),
    ("defaultNs: docker.io", lambda s: s.default_ns, "docker.io"),
    ("host: 127.0.0.1", lambda s: s.host, "127.0.0.1"),
    ("health: 8081", lambda s: s.health, 8081),
    ("metrics: 0", lambda s: s.metrics, 0),
    ("allowedUpstreams: [docker.io, '*.k8s.io']", lambda s: s.allowed_upstreams,
     ["docker.io", "*.k8s.io"]),
    ("tagTtl: 1h", lambda s: s.tag_ttl, 3600.0),
    ("negativeTtl: 10s", lambda s: s.negative_ttl, 10.0),
    ("workers: 4", lambda s: s.workers, 4),
    ("adminApi: {allowedNetworks: [127.0.0.0/8, '::1'], token: t}",
     lambda s: (s.admin_api.allowed_networks, s.admin_api.token),
     (["127.0.0.0/8", "::1"], "t")),
    ("pruneConfig: {enabled: true, duration: 30d, type: created, frequency: 1d,"
     " count: 50, dryRun: true, maxBytes: 20Gi}",
     lambda s: (s.prune.enabled, s.prune.duration, s.prune.type,
                s.prune.frequency, s.prune.count, s.prune.dry_run,
                s.prune.max_bytes),
     (True, 30 * 86400.0, "created", 86400.0, 50, True, 20 * 2**30)),
    ("serverTlsConfig: {cert: c.pem, key: k.pem, ca: ca.pem, clientAuth: verify}",
     lambda s: s.server_tls and (s.server_tls.cert, s.server_tls.key,
                                 s.server_tls.ca, s.server_tls.client_auth),
     ("c.pem", "k.pem", "ca.pem", "verify")),
    (REGISTRY + "    scheme: http", lambda s: first_registry(s).scheme, "http"),
    (REGISTRY + "    tagTtl: 10m", lambda s: first_registry(s).tag_ttl, 600.0),
    (REGISTRY + "    maxConcurrent: 3",
     lambda s: first_registry(s).max_concurrent, 3),
    (REGISTRY + "    auth: {user: u, password: p}",
     lambda s: (first_auth(s).user, first_auth(s).password), ("u", "p")),
    (REGISTRY + "    auth: {passwordFromEnv: QUAY_PASSWORD}",
     lambda s: first_auth(s).password_from_env, "QUAY_PASSWORD"),
    (REGISTRY + "    auth: {token: {static: abc}}",
     lambda s: first_auth(s).token and first_auth(s).token.static, "abc"),
    (REGISTRY + "    auth: {token: {provider: helper,"
     " providerOpts: name=ecr-login, expiry: 12h}}",
     lambda s: first_auth(s).token and (first_auth(s).token.provider_opts,
                                        first_auth(s).token.expiry),
     ({"name": "ecr-login"}, 12 * 3600.0)),
    (REGISTRY + "    auth: {token: {provider: helper,"
     " providerOpts: {name: gcr}}}",
     lambda s: first_auth(s).token and first_auth(s).token.provider_opts,
     {"name": "gcr"}),
    (REGISTRY + "    tls: {ca: ca.pem, cert: c.pem, key: k.pem,"
     " insecureSkipVerify: true}",
     lambda s: (first_tls(s).ca, first_tls(s).cert, first_tls(s).key,
                first_tls(s).insecure_skip_verify),
     ("ca.pem", "c.pem", "k.pem", True)),
]  # fmt: skip


@pytest.mark.parametrize(("text", "read", "expected"), KEYS)
def test_config_key_is_parsed(
    tmp_path: Path, text: str, read: Callable[[Settings], Any], expected: Any
) -> None:
    path = write_config(tmp_path, text)

    settings = load_settings(path, {})

    assert read(settings) == expected


def test_empty_config_file_gives_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, "# nothing set\n")

    settings = load_settings(path, {})

    assert settings == Settings(config_file=path)


def test_empty_value_keeps_the_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, "defaultNs:\nport: 9000\n")

    settings = load_settings(path, {})

    assert (settings.default_ns, settings.port) == ("", 9000)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("30d", 30 * 86400.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("100ns", 1e-7),
        ("2m3s", 123.0),
    ],
)
def test_duration_is_read_in_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "3x", "30", "d", "-1h", "1h 30m", "1.2.3s"])
def test_bad_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1000, 1000),
        ("1000", 1000),
        ("500Mi", 500 * 2**20),
        ("20Gi", 20 * 2**30),
        ("1Ti", 2**40),
        ("1.5Ki", 1536),
    ],
)
def test_size_is_read_in_bytes(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [-1, "20GB", "Gi", "ten", "1 Zi"])
def test_bad_size_is_refused(value: int | str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(value)


ERRORS = [
    ("pruneConfig:\n  duration: 3x\n", 'pruneConfig.duration: bad duration "3x"'),
    ("colour: blue\n", "colour: unknown key"),
    ("prot: 9000\n", 'prot: unknown key; did you mean "port"?'),
    ("pruneConfig: {enabled: true, frequncy: 1d}\n", "pruneConfig.frequncy: unknown"),
    ("port: '9000'\n", "port: expected an integer, got str"),
    ("port: 70000\n", "port: must be a port from 1 to 65535, got 70000"),
    ("health: -1\n", "health: must be a port"),
    ("workers: 0\n", "workers: must be at least 1, got 0"),
    ("airGapped: yes please\n", "airGapped: expected true or false, got str"),
    ("logLevel: loud\n", 'logLevel: must be one of debug, info, warn, error, got'),
    ("pullTimeout: 0\n", "pullTimeout: must be at least 1"),
    ("imagePath: ''\n", "imagePath: must not be empty"),
    ("registries: {name: quay.io}\n", "registries: expected a list, got dict"),
    ("registries: [{scheme: https}]\n", "registries[0].name: required"),
    ("registries: [{name: a}, {name: a}]\n", 'registries[1]: "a" is listed twice'),
    ("registries: [{name: a, scheme: ftp}]\n", "registries[0].scheme: must be one of"),
    ("registries: [{name: a, tlss: {}}]\n", 'registries[0].tlss: unknown key; did'),
    ("registries: [{name: a, tls: {cert: c.pem}}]\n",
     "registries[0].tls: cert and key go together"),
    ("registries: [{name: a, auth: {password: p, passwordFromEnv: P}}]\n",
     "registries[0].auth: set password or passwordFromEnv, not both"),
    ("registries: [{name: a, auth: {token: {expiry: 5}}}]\n",
     "registries[0].auth.token.expiry: expected a duration"),
    ("registries: [{name: a, auth: {token: {provider: ecr}}}]\n",
     'registries[0].auth.token.provider: "ecr" is "helper" here'),
    ("registries: [{name: a, auth: {token: {provider: helper}}}]\n",
     "registries[0].auth.token: provider helper needs providerOpts name="),
    ("registries: [{name: a, auth: {token: {provider: helper,"
     " providerOpts: oops}}}]\n",
     "registries[0].auth.token.providerOpts: expected key=value pairs"),
    ("pruneConfig: {type: newest}\n", "pruneConfig.type: must be one of accessed"),
    ("pruneConfig: {enabled: true, duration: 30d}\n",
     "pruneConfig.frequency: required when enabled"),
    ("pruneConfig: {maxBytes: 20GB}\n", 'pruneConfig.maxBytes: bad size "20GB"'),
    ("pruneConfig: {count: -2}\n", "pruneConfig.count: must be at least -1"),
    ("serverTlsConfig: {cert: c.pem}\n",
     "serverTlsConfig: cert and key are both required"),
    ("serverTlsConfig: {cert: c, key: k, clientAuth: maybe}\n",
     "serverTlsConfig.clientAuth: must be one of none, verify"),
    ("adminApi: {allowedNetworks: [10.0.0.0/33]}\n",
     "adminApi.allowedNetworks[0]: not a network in CIDR form"),
    ("- port\n", "expected a mapping of keys, got list"),
    ("port: [\n", "not valid YAML at line 2"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_settings(path, {})

    assert str(raised.value).startswith(f"config file {path}: ")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")

    with pytest.raises(ConfigError, match="absent.yaml: no such file"):
        load_settings(path, {})


def test_config_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(str(tmp_path), {})


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "port: 9000\nhost: 127.0.0.2\n")
    overrides = overrides_from_options({"--port": "9001", "--host": None})

    settings = load_settings(path, overrides)

    assert (settings.port, settings.host) == (9001, "127.0.0.2")


def test_file_value_is_used_when_flag_is_absent(tmp_path: Path) -> None:
    path = write_config(tmp_path, "port: 9000\nairGapped: true\n")
    overrides = overrides_from_options({"--port": None, "--air-gapped": False})

    settings = load_settings(path, overrides)

    assert (settings.port, settings.air_gapped) == (9000, True)


def test_defaults_apply_without_file_or_flags() -> None:
    settings = load_settings("", {})

    assert (settings.port, settings.log_level, settings.pull_timeout) == (
        8080,
        "error",
        60.0,
    )
    assert settings.image_path == "/var/lib/ociregistry"


def test_flags_become_typed_overrides() -> None:
    options = {
        "--pull-timeout": "2500",
        "--always-pull-latest": True,
        "--hello-world": False,
        "--default-ns": "docker.io",
        "--help": True,
    }

    overrides = overrides_from_options(options)

    assert overrides == {
        "pullTimeout": 2500,
        "alwaysPullLatest": True,
        "defaultNs": "docker.io",
    }


def test_pull_timeout_flag_is_milliseconds() -> None:
    settings = load_settings("", overrides_from_options({"--pull-timeout": "250"}))

    assert settings.pull_timeout == 0.25


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"--port": "abc"}, '--port: expected a number, got "abc"'),
        ({"--health": "1e3"}, '--health: expected a number, got "1e3"'),
        ({"--pull-timeout": "soon"}, "--pull-timeout: expected a number"),
    ],
)
def test_non_numeric_flag_is_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        overrides_from_options(options)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"logLevel": "loud"}, "--log-level: must be one of debug, info, warn, error"),
        ({"port": 0}, "--port: must be a port from 1 to 65535, got 0"),
        ({"pullTimeout": 0}, "--pull-timeout: must be at least 1"),
    ],
)
def test_bad_override_names_the_flag(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings("", overrides)


def test_password_from_env_is_read_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = AuthSettings(user="u", password_from_env="QUAY_PASSWORD")
    monkeypatch.setenv("QUAY_PASSWORD", "s3cret")

    assert auth.resolved_password() == "s3cret"
    assert AuthSettings(password="plain").resolved_password() == "plain"


def test_secrets_stay_out_of_repr() -> None:
    auth = AuthSettings(user="u", password="s3cret")

    assert "s3cret" not in repr(auth)


def test_wildcard_registry_turns_verification_on(tmp_path: Path) -> None:
    path = write_config(tmp_path, "registries: [{name: '*'}]\n")

    settings = load_settings(path, {})

    entry = settings.registry("ghcr.io")
    assert entry.name == "ghcr.io"
    assert entry.tls is None or not entry.tls.insecure_skip_verify


def test_readme_example_config_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = write_config(tmp_path, example)

    settings = load_settings(path, {})

    assert [entry.name for entry in settings.registries][:2] == ["*", "quay.io"]
    assert settings.prune.max_bytes == 20 * 2**30

"""Read settings from the YAML config file and the command line.

A config value is checked by a converter: a function that takes what YAML
(or the command line) gave and returns the typed value, or raises _Invalid.
A block of keys is a table of camelCase key -> (field name, converter), so
each key is listed once and its error names the key's full path.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from ociregistry.config import (
    AdminApiSettings,
    AuthSettings,
    PruneSettings,
    RegistrySettings,
    ServerTlsSettings,
    Settings,
    TlsSettings,
    TokenSettings,
)
from ociregistry.errors import ConfigError

Converter = Callable[[Any], Any]
KeyTable = Mapping[str, tuple[str, Converter]]

LOG_LEVELS = ("debug", "info", "warn", "error")

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # micro sign
    "μs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d)"
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti)?")
_SIZE_FACTORS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class _Invalid(Exception):
    """Raised by a converter when a value is unusable; records the key path."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []

    def at(self, key: str) -> _Invalid:
        """Prepend a key (or a `[n]` index) to the path of the bad value."""
        self.path.insert(0, key)
        return self

    def where(self) -> str:
        """Return the key path, as in `registries[0].auth.token.expiry`."""
        text = ""
        for part in self.path:
            text += part if part.startswith("[") or not text else "." + part
        return text


def parse_duration(text: str) -> float:
    """Return the seconds in a Go-style duration ("30d", "1h30m"); ValueError."""
    text = text.strip()
    if text == "0":
        return 0.0
    if not re.fullmatch(f"(?:{_DURATION_PART})+", text):
        raise ValueError(f'bad duration "{text}"')
    parts = re.findall(_DURATION_PART, text)
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_size(value: int | str) -> int:
    """Return the bytes in a size: an integer, or "500Mi", "20Gi", "1Ti"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'bad size "{value}"')
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[unit])


def _type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type_name(value)}")
    return value


def _required_text(value: object) -> str:
    if not _text(value).strip():
        raise _Invalid("must not be empty")
    return str(value)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_type_name(value)}")
    return value


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_type_name(value)}")
    return value


def _at_least(minimum: int) -> Callable[[Any], int]:
    def convert(value: object) -> int:
        number = _integer(value)
        if number < minimum:
            raise _Invalid(f"must be at least {minimum}, got {number}")
        return number

    return convert


def _port(value: object) -> int:
    number = _integer(value)
    if not 1 <= number <= 65535:
        raise _Invalid(f"must be a port from 1 to 65535, got {number}")
    return number


def _port_or_off(value: object) -> int:
    return 0 if _integer(value) == 0 else _port(value)


def _milliseconds(value: object) -> float:
    return _at_least(1)(value) / 1000.0


def _choice(*allowed: str) -> Converter:
    def convert(value: object) -> str:
        if _text(value) not in allowed:
            choices = ", ".join(allowed)
            raise _Invalid(f'must be one of {choices}, got "{value}"')
        return str(value)

    return convert


def _duration(value: object) -> float:
    if value == 0 and not isinstance(value, bool):
        return 0.0
    if not isinstance(value, str):
        raise _Invalid(f'expected a duration such as "30d" or "1h30m", got {value!r}')
    try:
        return parse_duration(value)
    except ValueError as error:
        raise _Invalid(str(error)) from None


def _size(value: object) -> int:
    try:
        return parse_size(value)  # type: ignore[arg-type]
    except ValueError as error:
        raise _Invalid(
            f"{error}: use bytes, or a number with Ki, Mi, Gi or Ti"
        ) from None


def _sequence(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list, got {_type_name(value)}")
    return value


def _each(convert: Converter) -> Converter:
    def convert_all(value: object) -> list[Any]:
        items = []
        for index, item in enumerate(_sequence(value)):
            try:
                items.append(convert(item))
            except _Invalid as error:
                raise error.at(f"[{index}]") from None
        return items

    return convert_all


def _network(value: object) -> str:
    try:
        ipaddress.ip_network(_text(value), strict=False)
    except ValueError:
        message = f'not a network in CIDR form (like 127.0.0.0/8): "{value}"'
        raise _Invalid(message) from None
    return str(value)


def _options(value: object) -> dict[str, str]:
    """Read `providerOpts`: "name=ecr-login,k=v" or a mapping of strings."""
    if isinstance(value, dict):
        return {str(key): _text(item) for key, item in value.items()}
    options = {}
    for pair in _text(value).split(","):
        key, equals, item = pair.strip().partition("=")
        if not equals or not key:
            raise _Invalid(f'expected key=value pairs, got "{value}"')
        options[key] = item
    return options


def _fields(value: object, keys: KeyTable) -> dict[str, Any]:
    """Convert a mapping by its key table; an empty value keeps the default."""
    if not isinstance(value, dict):
        raise _Invalid(f"expected a mapping of keys, got {_type_name(value)}")
    fields = {}
    for key, item in value.items():
        if key not in keys:
            raise _Invalid(_unknown_key(str(key), keys)).at(str(key))
        if item is None:
            continue
        name, convert = keys[key]
        try:
            fields[name] = convert(item)
        except _Invalid as error:
            raise error.at(key) from None
    return fields


def _unknown_key(key: str, keys: KeyTable) -> str:
    close = difflib.get_close_matches(key, list(keys), n=1)
    return f'unknown key; did you mean "{close[0]}"?' if close else "unknown key"


def _tls(value: object) -> TlsSettings:
    tls = TlsSettings(**_fields(value, _TLS_KEYS))
    if bool(tls.cert) != bool(tls.key):
        raise _Invalid("cert and key go together: set both or neither")
    return tls


def _token(value: object) -> TokenSettings:
    token = TokenSettings(**_fields(value, _TOKEN_KEYS))
    if token.static and token.provider:
        raise _Invalid("set static or provider, not both")
    if token.provider == "helper" and not token.provider_opts.get("name"):
        raise _Invalid("provider helper needs providerOpts name=<helper>")
    return token


def _provider(value: object) -> str:
    if value == "ecr":
        raise _Invalid('"ecr" is "helper" here, with providerOpts name=ecr-login')
    return str(_choice("helper")(value))


def _auth(value: object) -> AuthSettings:
    auth = AuthSettings(**_fields(value, _AUTH_KEYS))
    if auth.password and auth.password_from_env:
        raise _Invalid("set password or passwordFromEnv, not both")
    return auth


def _registry(value: object) -> RegistrySettings:
    fields = _fields(value, _REGISTRY_KEYS)
    if "name" not in fields:
        raise _Invalid('required: the upstream as host or host:port, or "*"').at("name")
    return RegistrySettings(**fields)


def _registries(value: object) -> list[RegistrySettings]:
    entries: list[RegistrySettings] = _each(_registry)(value)
    names = [entry.name for entry in entries]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise _Invalid(f'"{name}" is listed twice').at(f"[{index}]")
    return entries


def _prune(value: object) -> PruneSettings:
    prune = PruneSettings(**_fields(value, _PRUNE_KEYS))
    if prune.enabled and prune.frequency <= 0:
        raise _Invalid("required when enabled: how often to prune").at("frequency")
    if prune.enabled and prune.duration <= 0:
        raise _Invalid("required when enabled: the age to prune").at("duration")
    return prune


def _server_tls(value: object) -> ServerTlsSettings:
    tls = ServerTlsSettings(**_fields(value, _SERVER_TLS_KEYS))
    if not tls.cert or not tls.key:
        raise _Invalid("cert and key are both required to serve https")
    return tls


def _admin_api(value: object) -> AdminApiSettings:
    return AdminApiSettings(**_fields(value, _ADMIN_API_KEYS))


_TLS_KEYS: KeyTable = {
    "ca": ("ca", _text),
    "cert": ("cert", _text),
    "key": ("key", _text),
    "insecureSkipVerify": ("insecure_skip_verify", _boolean),
}
_TOKEN_KEYS: KeyTable = {
    "static": ("static", _text),
    "provider": ("provider", _provider),
    "providerOpts": ("provider_opts", _options),
    "expiry": ("expiry", _duration),
}
_AUTH_KEYS: KeyTable = {
    "user": ("user", _text),
    "password": ("password", _text),
    "passwordFromEnv": ("password_from_env", _text),
    "token": ("token", _token),
}
_REGISTRY_KEYS: KeyTable = {
    "name": ("name", _required_text),
    "scheme": ("scheme", _choice("https", "http")),
    "auth": ("auth", _auth),
    "tls": ("tls", _tls),
    "tagTtl": ("tag_ttl", _duration),
    "maxConcurrent": ("max_concurrent", _at_least(0)),
}
_PRUNE_KEYS: KeyTable = {
    "enabled": ("enabled", _boolean),
    "duration": ("duration", _duration),
    "type": ("type", _choice("accessed", "created")),
    "frequency": ("frequency", _duration),
    "count": ("count", _at_least(-1)),
    "dryRun": ("dry_run", _boolean),
    "maxBytes": ("max_bytes", _size),
}
_SERVER_TLS_KEYS: KeyTable = {
    "cert": ("cert", _text),
    "key": ("key", _text),
    "ca": ("ca", _text),
    "clientAuth": ("client_auth", _choice("none", "verify")),
}
_ADMIN_API_KEYS: KeyTable = {
    "allowedNetworks": ("allowed_networks", _each(_network)),
    "token": ("token", _text),
}
_TOP_LEVEL_KEYS: KeyTable = {
    "imagePath": ("image_path", _required_text),
    "logLevel": ("log_level", _choice(*LOG_LEVELS)),
    "logFile": ("log_file", _text),
    "preloadImages": ("preload_images", _text),
    "imageFile": ("image_file", _text),
    "resolveRef": ("resolve_ref", _text),
    "port": ("port", _port),
    "os": ("os", _text),
    "arch": ("arch", _text),
    "pullTimeout": ("pull_timeout", _milliseconds),
    "alwaysPullLatest": ("always_pull_latest", _boolean),
    "airGapped": ("air_gapped", _boolean),
    "helloWorld": ("hello_world", _boolean),
    "defaultNs": ("default_ns", _text),
    "host": ("host", _required_text),
    "health": ("health", _port_or_off),
    "metrics": ("metrics", _port_or_off),
    "registries": ("registries", _registries),
    "pruneConfig": ("prune", _prune),
    "serverTlsConfig": ("server_tls", _server_tls),
    "allowedUpstreams": ("allowed_upstreams", _each(_required_text)),
    "adminApi": ("admin_api", _admin_api),
    "tagTtl": ("tag_ttl", _duration),
    "negativeTtl": ("negative_ttl", _duration),
    "workers": ("workers", _at_least(1)),
}

# Command-line flags that override a config file key, and how to read their
# text. Boolean flags override only when given.
FLAGS: Mapping[str, tuple[str, type]] = {
    "--log-level": ("logLevel", str),
    "--image-path": ("imagePath", str),
    "--log-file": ("logFile", str),
    "--preload-images": ("preloadImages", str),
    "--image-file": ("imageFile", str),
    "--resolve-ref": ("resolveRef", str),
    "--port": ("port", int),
    "--os": ("os", str),
    "--arch": ("arch", str),
    "--pull-timeout": ("pullTimeout", int),
    "--health": ("health", int),
    "--metrics": ("metrics", int),
    "--always-pull-latest": ("alwaysPullLatest", bool),
    "--air-gapped": ("airGapped", bool),
    "--hello-world": ("helloWorld", bool),
    "--default-ns": ("defaultNs", str),
    "--host": ("host", str),
}


def overrides_from_options(options: Mapping[str, object]) -> dict[str, object]:
    """Turn parsed command-line options into config-key overrides."""
    overrides: dict[str, object] = {}
    for flag, (key, kind) in FLAGS.items():
        value = options.get(flag)
        if value is None or value is False:
            continue
        if kind is int and not re.fullmatch(r"-?\d+", str(value)):
            raise ConfigError(f'{flag}: expected a number, got "{value}"')
        overrides[key] = kind(value)
    return overrides


def load_settings(
    config_file: str = "", overrides: Mapping[str, object] | None = None
) -> Settings:
    """Return settings from defaults, the config file, then the overrides.

    `overrides` maps config keys (camelCase) to values typed as YAML would
    give them; `overrides_from_options` makes them from the command line.
    Raise ConfigError naming the file and key, or the flag, of a bad value.
    """
    fields = read_config_file(config_file) if config_file else {}
    for key, value in (overrides or {}).items():
        try:
            fields.update(_fields({key: value}, _TOP_LEVEL_KEYS))
        except _Invalid as error:
            raise ConfigError(f"{_flag_of(key)}: {error.message}") from None
    return Settings(config_file=config_file, **fields)


def read_config_file(path: str) -> dict[str, Any]:
    """Return the settings fields a config file sets; raise ConfigError."""
    data = yaml_data(path)
    if data is None:
        return {}
    try:
        return _fields(data, _TOP_LEVEL_KEYS)
    except _Invalid as error:
        where = f"{error.where()}: " if error.path else ""
        raise ConfigError(f"config file {path}: {where}{error.message}") from None


def yaml_data(path: str) -> object:
    """Return the parsed YAML of a file; raise ConfigError when unreadable."""
    try:
        with open(path, encoding="utf-8") as stream:
            return yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: {_yaml_problem(error)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or "not valid YAML"
    if mark is None:
        return f"not valid YAML: {problem}"
    return (
        f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    )


def _flag_of(key: str) -> str:
    for flag, (flag_key, _kind) in FLAGS.items():
        if flag_key == key:
            return flag
    return key

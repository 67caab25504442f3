"""The command line: global options, then one command and its options."""

from __future__ import annotations

import datetime
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from typing import Any

from docopt import DocoptExit, docopt

import ociregistry
from ociregistry.config import Settings
from ociregistry.configfile import load_settings, overrides_from_options
from ociregistry.errors import ConfigError

PROGRAM = "ociregistry"

# Each help text below is also the docopt grammar of its command, once the
# words "[global options] " are dropped from its usage line.
GLOBAL_OPTIONS = "[global options] "

GLOBAL_HELP = """\
OCI Registry: pull-only, pull-through, caching OCI Distribution Server.

Usage:
  ociregistry [global options] command [command options]

Commands:
  serve    Run the registry server
  load     Load images into the cache, then exit
  list     List the cached manifests
  prune    Remove cached manifests, and the blobs no other manifest uses
  version  Print the version and build date
  help, h  Show this help, or the help of one command

Global options (placed before the command):
  --log-level LEVEL   debug, info, warn or error (default: error)
  --config-file PATH  YAML file of settings; the command line overrides it
  --image-path PATH   Cache root (default: /var/lib/ociregistry)
  --log-file PATH     Log to this file instead of the console
  -h, --help          Show help

Run "ociregistry help COMMAND" or "ociregistry COMMAND --help" for the
options of a command.
"""

# docopt reads the global usage with the command and its options as
# arguments left for the command's own grammar.
_GLOBAL_GRAMMAR = GLOBAL_HELP.replace(
    "[global options] command [command options]", "[options] [<args>...]"
)

SERVE_HELP = """\
Usage: ociregistry [global options] serve [options]

Run the registry server: serve pulls from the cache, filling it from the
upstreams.

Options:
  --preload-images SPEC  Load images (files, globs, comma-separated) before
                         serving
  --port N               Listen port (default: 8080)
  --os OS                Platform OS chosen when loading and when pre-fetching
                         image manifests from an index (default: this host's)
  --arch ARCH            Platform architecture, as --os (default: this host's)
  --pull-timeout MS      Upper bound in milliseconds on one upstream pull, and
                         on waiting behind another request's pull
                         (default: 60000)
  --health N             Serve GET /health (200) on this extra port
  --metrics N            Serve Prometheus GET /metrics on this extra port
  --always-pull-latest   Re-fetch a "latest" tag from the upstream on every pull
  --hello-world          Test mode: serve only docker.io/hello-world:latest
                         from an image built in, with no upstream traffic
  --air-gapped           Never contact an upstream; un-cached content is 404
  --default-ns NS        Upstream used when a request names none
  --host ADDR            Listen address (default: 0.0.0.0)
  -h, --help             Show this help
"""

LOAD_HELP = """\
Usage: ociregistry [global options] load [options]

Load images into the cache, then exit. The server must not be running on the
same image path.

Options:
  --image-file SPEC   Required: image list files or image tarballs (a file,
                      a quoted glob, or a comma-separated mix of both)
  --resolve-ref REF   Name for the image in a single-image tarball without a
                      usable tag
  --os OS             Platform OS to load (default: this host's)
  --arch ARCH         Platform architecture to load (default: this host's)
  --pull-timeout MS   Upper bound in milliseconds on one upstream pull
                      (default: 60000)
  -h, --help          Show this help
"""

LIST_HELP = """\
Usage: ociregistry [global options] list [options]

List the cached manifests, one per line: image, tag or digest, type, created,
pulled, size in MB. Never writes to the cache.

Options:
  --header          Print a header line first
  --pattern P1,P2   Only images whose URL matches one of these regular
                    expressions
  --short-digest    Print digests shortened
  -h, --help        Show this help
"""

PRUNE_HELP = """\
Usage: ociregistry [global options] prune [options]

Remove matching manifests (and the cached images of a matching index), then
the blobs no remaining manifest references. Prints what it removes.

Options:
  --pattern P1,P2             Manifests whose image URL matches one of these
                              regular expressions
  --date YYYY-MM-DDTHH:MM:SS  Manifests created before this local time
  --dry-run                   Print what would be removed; remove nothing
  -h, --help                  Show this help
"""

VERSION_HELP = """\
Usage: ociregistry [global options] version [options]

Print the version and build date.

Options:
  -h, --help  Show this help
"""

HELP_HELP = """\
Usage: ociregistry [global options] help [options] [COMMAND]

Show the help of the program, or of one command.

Options:
  -h, --help  Show this help
"""

COMMAND_HELP = {
    "serve": SERVE_HELP,
    "load": LOAD_HELP,
    "list": LIST_HELP,
    "prune": PRUNE_HELP,
    "version": VERSION_HELP,
    "help": HELP_HELP,
}
ALIASES = {"h": "help"}

_OPTION_LINE = re.compile(r"^ +(?:-\w, )?(--[\w-]+)( \S+)?", re.MULTILINE)
_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def run(argv: list[str]) -> int:
    """Run the command line `argv` (without the program name); return the status.

    A bad option, value or config file ends in one line on stderr, status 1.
    """
    try:
        return _run(argv)
    except ConfigError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    global_options = _parse(_GLOBAL_GRAMMAR, argv, "", options_first=True)
    words = global_options["<args>"]
    if global_options["--help"] or not words:
        print(GLOBAL_HELP, end="")
        return 0

    command = ALIASES.get(words[0], words[0])
    if command not in COMMAND_HELP:
        names = ", ".join(COMMAND_HELP)
        raise ConfigError(f'unknown command "{words[0]}" (commands: {names})')
    help_text = COMMAND_HELP[command]
    options = _parse(_grammar(help_text), [command, *words[1:]], command)
    if options["--help"]:
        print(help_text, end="")
        return 0

    if command == "help":
        return show_help(options["COMMAND"])
    if command == "version":
        return show_version()
    settings = _load(global_options, options)
    settings.command_line = command_line(argv)
    return _COMMANDS[command](settings, options)


def _grammar(help_text: str) -> str:
    return help_text.replace(GLOBAL_OPTIONS, "", 1)


def _parse(
    grammar: str, argv: list[str], command: str, options_first: bool = False
) -> Mapping[str, Any]:
    """Parse argv by a docopt grammar; raise ConfigError for bad arguments."""
    _reject_unknown_options(grammar, argv, command, options_first)
    try:
        return docopt(grammar, argv, default_help=False, options_first=options_first)
    except DocoptExit as error:
        raise ConfigError(_docopt_problem(str(error.code), argv, command)) from None


def _reject_unknown_options(
    grammar: str, argv: list[str], command: str, options_first: bool
) -> None:
    """Raise ConfigError naming the first option the grammar does not know."""
    known = {name: bool(value) for name, value in _OPTION_LINE.findall(grammar)}
    known["-h"] = False
    words = iter(argv)
    for word in words:
        if word == "--" or (options_first and not word.startswith("-")):
            return
        if not word.startswith("-") or word == "-":
            continue
        name, equals, _value = word.partition("=")
        if name not in known:
            raise ConfigError(_unknown_option(name, command))
        if known[name] and not equals:
            next(words, None)


def _unknown_option(name: str, command: str) -> str:
    if not command:
        return f"unknown option {name} (see {PROGRAM} --help)"
    if re.search(rf"^ +{re.escape(name)} ", GLOBAL_HELP, re.MULTILINE):
        return f"{name} is a global option: place it before the command"
    return f"unknown option {name} for {command} (see {PROGRAM} {command} --help)"


def _docopt_problem(message: str, argv: list[str], command: str) -> str:
    first_line = message.splitlines()[0] if message else ""
    if first_line and not first_line.lower().startswith(("usage:", "warning:")):
        return first_line
    arguments = shlex.join(argv[1:] if command else argv)
    where = f" for {command}" if command else ""
    return f"unexpected arguments{where}: {arguments}"


def _load(global_options: Mapping[str, Any], options: Mapping[str, Any]) -> Settings:
    """Read the settings: defaults, then the config file, then the flags."""
    overrides = overrides_from_options({**global_options, **options})
    config_file = global_options["--config-file"]
    return load_settings(str(config_file or ""), overrides)


def command_line(argv: list[str]) -> str:
    """Return the command line as typed, for the start-up banner."""
    program = sys.argv[0] if sys.argv and sys.argv[0] else PROGRAM
    if program.endswith("__main__.py") or program == "-c":
        program = f"{sys.executable} -m {PROGRAM}"
        return f"{program} {shlex.join(argv)}".strip()
    return shlex.join([program, *argv])


def show_help(command: object) -> int:
    """Print the help of one command, or of the program when none is named."""
    if command is None:
        print(GLOBAL_HELP, end="")
        return 0
    name = ALIASES.get(str(command), str(command))
    if name not in COMMAND_HELP:
        raise ConfigError(f'no help for unknown command "{command}"')
    print(COMMAND_HELP[name], end="")
    return 0


def show_version() -> int:
    """Print the version and the build date."""
    print(f"Version: {ociregistry.__version__}, build date: {ociregistry.build_date()}")
    return 0


def _serve(settings: Settings, options: Mapping[str, Any]) -> int:
    # Imported here so that one command's missing piece cannot break another.
    from ociregistry.server import serve

    return serve(settings)


def _load_images(settings: Settings, options: Mapping[str, Any]) -> int:
    if not settings.image_file:
        raise ConfigError("load needs --image-file (or imageFile in the config file)")
    from ociregistry.loader import run_load

    return run_load(settings)


def _list(settings: Settings, options: Mapping[str, Any]) -> int:
    from ociregistry.listing import run_list

    patterns = parse_patterns(options["--pattern"])
    header, short_digest = bool(options["--header"]), bool(options["--short-digest"])
    return run_list(settings, header, patterns, short_digest)


def _prune(settings: Settings, options: Mapping[str, Any]) -> int:
    from ociregistry.prune import run_prune

    patterns = parse_patterns(options["--pattern"])
    date = parse_date(options["--date"])
    return run_prune(settings, patterns, date, bool(options["--dry-run"]))


_COMMANDS: dict[str, Callable[[Settings, Mapping[str, Any]], int]] = {
    "serve": _serve,
    "load": _load_images,
    "list": _list,
    "prune": _prune,
}


def parse_patterns(value: object) -> list[str]:
    """Split `--pattern P1,P2` into regular expressions, checking each."""
    patterns = [part.strip() for part in str(value or "").split(",") if part.strip()]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            message = f'--pattern: bad regular expression "{pattern}": {error}'
            raise ConfigError(message) from None
    return patterns


def parse_date(value: object) -> datetime.datetime | None:
    """Read `--date YYYY-MM-DDTHH:MM:SS` as a naive local time, or None."""
    if value is None:
        return None
    try:
        return datetime.datetime.strptime(str(value), _DATE_FORMAT)
    except ValueError:
        raise ConfigError(
            f'--date: expected YYYY-MM-DDTHH:MM:SS, got "{value}"'
        ) from None

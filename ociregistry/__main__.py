"""Entry point: `python -m ociregistry` and the `bin/ociregistry` zipapp."""

# gevent must patch the standard library before anything imports sockets,
# ssl or threading (Bottle, urllib3, logging handlers).
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402


def main() -> None:
    """Run the command line and exit with its status."""
    from ociregistry.cli import run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()

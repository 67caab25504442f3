"""A pull-only, pull-through, caching OCI registry."""

__version__ = "2.0.0"


def build_date() -> str:
    """Return the UTC build date stamped by `make server`, or "dev"."""
    try:
        from ociregistry._buildinfo import BUILD_DATE
    except ImportError:
        return "dev"
    return str(BUILD_DATE)

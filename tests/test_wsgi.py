"""Unit tests of the access-log middleware."""

from __future__ import annotations

import pytest

from ociregistry.wsgi import describe_headers, format_latency


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.000663938, "663.938µs"),
        (0.001187488, "1.187488ms"),
        (0.047179364, "47.179364ms"),
        (1.5, "1.5s"),
        (0.0000005, "500ns"),
    ],
)
def test_latency_reads_like_the_go_server(seconds, text):
    assert format_latency(seconds) == text


def test_debug_headers_withhold_credentials():
    environ = {
        "HTTP_AUTHORIZATION": "Bearer s3cret",
        "HTTP_PROXY_AUTHORIZATION": "Basic s3cret",
        "HTTP_COOKIE": "session=s3cret",
        "HTTP_USER_AGENT": "skopeo/1.9",
        "HTTP_X_REGISTRY": "quay.io",
        "QUERY_STRING": "ns=x",
    }

    described = describe_headers(environ)

    assert "s3cret" not in described
    assert "Authorization=<withheld>" in described
    assert "User-Agent=skopeo/1.9" in described
    assert "X-Registry=quay.io" in described

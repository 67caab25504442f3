"""Unit tests of request naming: upstream choice, names, tags, digests."""

from __future__ import annotations

import pytest

from ociregistry.errors import Denied, DigestInvalid, NameInvalid
from ociregistry.reference import (
    Repository,
    TagInvalid,
    UpstreamPolicy,
    check_digest,
    check_reference,
)

HEX = "a" * 64


@pytest.mark.parametrize(
    ("path_name", "header", "ns", "default", "expected"),
    [
        (
            "kube-scheduler",
            "",
            "registry.k8s.io",
            "",
            ("registry.k8s.io", "kube-scheduler"),
        ),
        ("registry.k8s.io/pause", "", "", "", ("registry.k8s.io", "pause")),
        ("localhost/a/b", "", "", "", ("localhost", "a/b")),
        ("127.0.0.2/a/b/c/d/e", "", "", "", ("127.0.0.2", "a/b/c/d/e")),
        ("host:5000/x", "", "", "", ("host:5000", "x")),
        ("pause", "quay.io", "registry.k8s.io", "", ("quay.io", "pause")),
        ("pause", "", "", "ghcr.io", ("ghcr.io", "pause")),
        ("hello-world", "", "docker.io", "", ("docker.io", "library/hello-world")),
        ("index.docker.io/nginx", "", "", "", ("docker.io", "library/nginx")),
        ("docker.io/bitnami/redis", "", "", "", ("docker.io", "bitnami/redis")),
        ("Registry.K8s.IO/pause", "", "", "", ("registry.k8s.io", "pause")),
    ],
)
def test_upstream_is_chosen_in_spec_order(path_name, header, ns, default, expected):
    policy = UpstreamPolicy(default_ns=default)

    repo = policy.resolve(path_name, header, ns)

    assert (repo.upstream, repo.name) == expected


def test_request_naming_no_upstream_is_name_invalid_with_advice():
    with pytest.raises(NameInvalid, match="--default-ns"):
        UpstreamPolicy().resolve("pause", "", "")


@pytest.mark.parametrize(
    "path_name",
    [
        "registry.k8s.io/../etc",
        "registry.k8s.io/a/../../b",
        "registry.k8s.io//etc/passwd",
        "registry.k8s.io/UPPER",
        "registry.k8s.io/a_",
        "registry.k8s.io/" + "a" * 256,
        "registry.k8s.io/.hidden",
    ],
)
def test_malformed_repository_names_are_rejected(path_name):
    with pytest.raises(NameInvalid):
        UpstreamPolicy().resolve(path_name, "", "")


@pytest.mark.parametrize("ns", ["bad host", "a/b", "../x", "host:port:1", "-x.io"])
def test_malformed_namespaces_are_rejected(ns):
    with pytest.raises(NameInvalid):
        UpstreamPolicy().resolve("pause", "", ns)


def test_allow_list_admits_patterns_and_denies_others():
    policy = UpstreamPolicy(
        allowed=("registry.k8s.io", "*.example.com", "10.1.2.3:5000")
    )

    assert policy.resolve("pause", "", "registry.k8s.io").upstream == "registry.k8s.io"
    assert policy.resolve("x", "", "a.example.com").upstream == "a.example.com"
    assert policy.resolve("x", "", "10.1.2.3:5000").upstream == "10.1.2.3:5000"
    with pytest.raises(Denied):
        policy.resolve("x", "", "169.254.169.254")


def test_digests_must_be_sha256_hex():
    assert check_digest(f"sha256:{HEX}") == HEX
    with pytest.raises(DigestInvalid, match="unsupported"):
        check_digest("sha512:" + "a" * 128)
    for bad in (f"sha256:{HEX[:-1]}", f"sha256:{HEX.upper()}", "sha256:../../etc", "x"):
        with pytest.raises(DigestInvalid):
            check_digest(bad)


def test_tags_are_case_sensitive_and_bounded():
    assert check_reference("CaseTag") == "CaseTag"
    assert check_reference("v1.29.1") == "v1.29.1"
    for bad in ("-x", "a" * 129, "a/b", "..", ".x"):
        with pytest.raises((TagInvalid, DigestInvalid)):
            check_reference(bad)


def test_image_urls_name_tags_and_digests():
    repo = Repository("registry.k8s.io", "kube-scheduler")

    assert repo.image_url("v1.29.1") == "registry.k8s.io/kube-scheduler:v1.29.1"
    assert (
        repo.image_url(f"sha256:{HEX}")
        == f"registry.k8s.io/kube-scheduler@sha256:{HEX}"
    )

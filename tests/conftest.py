"""Fixtures shared by every test: upstreams, our server, a cache root."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from support.fake_upstream import FakeUpstream
from support.images import Image, ImageIndex, standard_content
from support.processes import ServerFactory
from support.push import push_content
from support.upstream import RegistryUpstream, registry_binary

REGISTRY_MISSING = "docker-registry is not installed (apt-get install docker-registry)"

Content = Mapping[str, Image | ImageIndex]


def start_upstream(
    workdir: Path, content: Content | None = None, **options: Any
) -> RegistryUpstream:
    """Start a docker-registry and push `content` (`repo:tag` → item) to it."""
    if registry_binary() is None:
        pytest.skip(REGISTRY_MISSING)
    upstream = RegistryUpstream(workdir, **options).start()
    if content:
        ca_certs = upstream.tls.ca if upstream.tls else None
        try:
            push_content(upstream.url, content, upstream.basic_auth, ca_certs)
        except BaseException:
            upstream.stop()
            raise
        upstream.content = dict(content)
    return upstream


@pytest.fixture(scope="session")
def registry_upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryUpstream]:
    """A docker-registry holding `standard_content()`, shared by the session.

    As root it listens on a loopback address of its own on port 80, so that
    clients can name it in-path (`127.0.0.1:PORT/127.0.0.2/single/oci:1`).
    Tests must not stop it or push to it; use `registry_upstream_factory`.
    """
    port = None if os.geteuid() == 0 else 0
    workdir = tmp_path_factory.mktemp("upstream")
    upstream = start_upstream(workdir, standard_content(), port=port)
    yield upstream
    upstream.stop()


@pytest.fixture
def registry_upstream_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., RegistryUpstream]]:
    """Start docker-registries of a test's own; each is stopped afterwards.

    Call it as `factory(content=None, **RegistryUpstream options)`.
    """
    started: list[RegistryUpstream] = []

    def start(content: Content | None = None, **options: Any) -> RegistryUpstream:
        workdir = tmp_path / f"upstream-{len(started)}"
        upstream = start_upstream(workdir, content, **options)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def fake_upstream() -> Iterator[Callable[..., FakeUpstream]]:
    """Start in-process fake registries; each is closed afterwards.

    Call it as `fake_upstream(address="127.0.0.1", auth=None, …)`.
    """
    fakes: list[FakeUpstream] = []

    def make(**options: Any) -> FakeUpstream:
        fake = FakeUpstream(**options)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.close()


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    """An empty cache root for our server."""
    root = tmp_path / "cache"
    root.mkdir()
    return root


@pytest.fixture
def oci_server(tmp_path: Path, cache_root: Path) -> Iterator[ServerFactory]:
    """Start our server: `oci_server(*serve_args, config=…, image_path=…)`.

    Each call returns a ready `OciServer` on a free port, by default on
    `cache_root`; every server started is stopped at teardown.
    """
    factory = ServerFactory(tmp_path / "servers", cache_root)
    yield factory
    factory.stop_all()

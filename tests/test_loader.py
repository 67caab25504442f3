"""The load command and --preload-images: image lists and tarballs, end to end."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml
from support.images import ImageIndex, make_image, make_index
from support.processes import REPO_ROOT

from ociregistry.config import Settings, with_host_platform
from ociregistry.errors import ConfigError, RegistryError
from ociregistry.loader import expand_spec, parse_image_reference, read_image_list
from ociregistry.manifest import DOCKER_IMAGE
from ociregistry.progress import Progress, Summary, format_size
from ociregistry.reference import Repository
from ociregistry.store import Store

CLI_TIMEOUT = 120


# -- helpers ---------------------------------------------------------------------


def run_cli(
    image_path: Path, *args: str, config: dict | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m ociregistry --image-path … ARGS` and wait for it."""
    argv = [sys.executable, "-m", "ociregistry", "--image-path", str(image_path)]
    if config is not None:
        config_path = image_path.parent / f"{image_path.name}-config.yml"
        config_path.write_text(yaml.safe_dump(config))
        argv += ["--config-file", str(config_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env
    )


def load(
    image_path: Path, spec: str, *options: str, config: dict | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(image_path, "load", "--image-file", spec, *options, config=config)


def skopeo_copy(source: str, target: str, *options: str) -> None:
    done = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", *options, source, target],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr


def cache_state(root: Path) -> dict[str, tuple[int, int]]:
    """Return every cache file (locks aside) with its size and mtime."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and ".locks" not in path.parts
    }


def upstream_config(*upstreams) -> dict:
    return {"registries": [upstream.registry_config() for upstream in upstreams]}


def upstream_requests(upstream) -> int:
    counts = upstream.request_counts()
    return sum(
        n
        for (_, path), n in counts.items()
        if path.startswith("/v2/") and path != "/v2/"
    )


def make_archives(upstream, directory: Path) -> dict[str, Path]:
    """Write tarballs of an upstream's images with skopeo, plus gzip'd copies."""
    ns = upstream.namespace
    source = f"docker://{upstream.host_port}"
    archives = {
        "docker": directory / "docker.tar",
        "docker-unnamed": directory / "unnamed.tar",
        "oci": directory / "oci.tar",
        "oci-tag-only": directory / "tag-only.tar",
    }
    skopeo_copy(
        f"{source}/single/oci:1",
        f"docker-archive:{archives['docker']}:{ns}/single/oci:1",
    )
    skopeo_copy(
        f"{source}/single/docker:1", f"docker-archive:{archives['docker-unnamed']}"
    )
    skopeo_copy(
        f"{source}/multi/arch:1.0",
        f"oci-archive:{archives['oci']}:{ns}/multi/arch:1.0",
        "--all",
    )
    skopeo_copy(f"{source}/a/b/c/d/e:1", f"oci-archive:{archives['oci-tag-only']}:v1")
    for name in ("docker", "oci"):
        packed = directory / f"{archives[name].name}.gz"
        packed.write_bytes(gzip.compress(archives[name].read_bytes(), compresslevel=1))
        archives[f"{name}-gz"] = packed
    return archives


@pytest.fixture(scope="session")
def archives(registry_upstream, tmp_path_factory) -> dict[str, Path]:
    """Tarballs made by skopeo from the session upstream's standard content."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    return make_archives(registry_upstream, tmp_path_factory.mktemp("archives"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -- references, specs, lists ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "upstream", "name", "reference"),
    [
        ("alpine", "docker.io", "library/alpine", "latest"),
        ("docker.io/library/alpine:3.19", "docker.io", "library/alpine", "3.19"),
        ("index.docker.io/bitnami/redis:7", "docker.io", "bitnami/redis", "7"),
        ("registry.k8s.io/pause:3.8", "registry.k8s.io", "pause", "3.8"),
        ("localhost:5000/a/b/c:CaseTag", "localhost:5000", "a/b/c", "CaseTag"),
        ("127.0.0.2/single/oci", "127.0.0.2", "single/oci", "latest"),
        (f"quay.io/x/y:1@sha256:{'a' * 64}", "quay.io", "x/y", f"sha256:{'a' * 64}"),
        (
            f"busybox@sha256:{'b' * 64}",
            "docker.io",
            "library/busybox",
            f"sha256:{'b' * 64}",
        ),
    ],
)
def test_image_references_resolve_to_repository_and_reference(
    text, upstream, name, reference
):
    assert parse_image_reference(text) == (Repository(upstream, name), reference)


@pytest.mark.parametrize(
    "text", ["Alpine:3", "quay.io/x/y@sha256:abc", "a b", "alpine:bad tag", ""]
)
def test_bad_image_references_are_refused(text):
    with pytest.raises(RegistryError):
        parse_image_reference(text)


def test_image_list_skips_comments_and_blank_lines(tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text("# the base images\n\nalpine:3.19\n  busybox  # small\r\n\n")

    assert read_image_list(str(listing)) == ["alpine:3.19", "busybox"]


def test_spec_expands_globs_and_comma_separated_files_in_order(tmp_path):
    for name in ("b.tar", "a.tar", "list.txt"):
        (tmp_path / name).write_text("x")

    paths = expand_spec(f"{tmp_path}/list.txt, {tmp_path}/*.tar,{tmp_path}/a.tar")

    assert paths == [str(tmp_path / n) for n in ("list.txt", "a.tar", "b.tar")]


@pytest.mark.parametrize("spec", ["{d}/missing.tar", "{d}/*.nothing", " , "])
def test_spec_naming_no_file_is_a_config_error(tmp_path, spec):
    with pytest.raises(ConfigError):
        expand_spec(spec.format(d=tmp_path))


def test_empty_platform_means_this_hosts_and_explicit_one_stays():
    chosen = with_host_platform(Settings(os="linux", arch="arm/v7"))
    host = with_host_platform(Settings())

    assert (chosen.os, chosen.arch) == ("linux", "arm/v7")
    assert host.os and host.arch and "x86_64" not in host.arch


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB")],
)
def test_sizes_are_shown_in_binary_units(count, text):
    assert format_size(count) == text


def test_progress_reports_each_image_and_sums_them_up():
    stream = io.StringIO()
    progress = Progress(stream)

    progress.loaded("a.example/x:1", 2048, 0.5)
    progress.cached("a.example/y:1")
    progress.close()

    assert stream.getvalue() == (
        "loaded a.example/x:1 (2.0 KiB in 0.5s)\nalready cached a.example/y:1\n"
    )
    assert progress.summary.describe().startswith(
        "loaded 1 image (2.0 KiB written) in "
    )
    assert progress.summary.describe().endswith("; 1 already cached, 0 failed")


def test_summary_says_when_there_was_nothing_to_load():
    summary = Summary(cached=2)

    assert summary.describe().startswith(
        "nothing to load: 2 images already cached, nothing fetched or written"
    )


# -- tarballs made by skopeo -----------------------------------------------------


def test_docker_archive_is_cached_under_its_repo_tag(registry_upstream, archives, root):
    ns = registry_upstream.namespace

    done = load(root, str(archives["docker"]))

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("loaded 1 image")
    manifest = Store(str(root)).find_manifest(f"{ns}/single/oci:1")
    assert manifest is not None and manifest.media_type == DOCKER_IMAGE
    assert all(Store(str(root)).has_blob(b.digest[7:]) for b in manifest.blobs())
    listed = run_cli(root, "list")
    assert f"{ns}/single/oci 1 image" in listed.stdout


def test_oci_archive_of_an_index_caches_it_with_every_image(
    registry_upstream, archives, root
):
    ns = registry_upstream.namespace
    index: ImageIndex = registry_upstream.content["multi/arch:1.0"]

    done = load(root, str(archives["oci"]))

    assert done.returncode == 0, done.stderr
    store = Store(str(root))
    cached = store.find_manifest(f"{ns}/multi/arch:1.0")
    assert cached is not None and cached.is_index
    for child in cached.children():
        image = store.find_manifest(f"{ns}/multi/arch@{child.digest}")
        assert image is not None
        assert all(store.has_blob(b.digest[7:]) for b in image.blobs())
    assert len(cached.children()) == len(index.images)


@pytest.mark.parametrize("name", ["docker", "oci"])
def test_gzip_archive_loads_the_same_manifest_as_the_plain_one(
    archives, tmp_path, name
):
    plain, packed = tmp_path / "plain", tmp_path / "packed"

    first = load(plain, str(archives[name]))
    second = load(packed, str(archives[f"{name}-gz"]))

    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert os.listdir(plain / "img") + os.listdir(plain / "lts") == os.listdir(
        packed / "img"
    ) + os.listdir(packed / "lts")
    assert sorted(os.listdir(plain / "blobs")) == sorted(os.listdir(packed / "blobs"))


def test_unnamed_archive_needs_resolve_ref(registry_upstream, archives, root):
    ns = registry_upstream.namespace

    refused = load(root, str(archives["docker-unnamed"]))
    named = load(
        root, str(archives["docker-unnamed"]), "--resolve-ref", f"{ns}/named/app:7"
    )

    assert refused.returncode == 1
    assert "--resolve-ref" in refused.stderr
    assert named.returncode == 0, named.stderr
    assert Store(str(root)).find_manifest(f"{ns}/named/app:7") is not None


def test_tag_only_ref_name_is_the_tag_of_the_resolve_ref_repository(
    registry_upstream, archives, root
):
    ns = registry_upstream.namespace

    done = load(root, str(archives["oci-tag-only"]), "--resolve-ref", f"{ns}/e/app")

    assert done.returncode == 0, done.stderr
    assert Store(str(root)).find_manifest(f"{ns}/e/app:v1") is not None


def test_globs_and_comma_mixes_load_every_file(
    registry_upstream, archives, root, tmp_path
):
    ns = registry_upstream.namespace
    folder = tmp_path / "drop"
    folder.mkdir()
    for name in ("docker", "oci"):
        shutil.copy(archives[name], folder)
    listing = tmp_path / "images.txt"
    listing.write_text(f"{ns}/single/oci:latest\n")

    done = load(
        root, f"{folder}/*.tar,{listing}", config=upstream_config(registry_upstream)
    )

    assert done.returncode == 0, done.stderr
    assert "loaded 3 images" in done.stdout
    store = Store(str(root))
    for url in ("single/oci:1", "multi/arch:1.0", "single/oci:latest"):
        assert store.find_manifest(f"{ns}/{url}") is not None


# -- image lists through the real upstream ---------------------------------------


def test_image_list_pulls_the_platform_image_and_its_blobs(
    registry_upstream, root, tmp_path
):
    ns = registry_upstream.namespace
    index: ImageIndex = registry_upstream.content["multi/arch:1.0"]
    amd64, arm64 = index.images
    nested = registry_upstream.content["a/b/c/d/e:1"]
    listing = tmp_path / "images.txt"
    listing.write_text(
        f"# test images\n{ns}/multi/arch:1.0\n\n{ns}/a/b/c/d/e@{nested.digest}\n"
    )

    done = load(
        root,
        str(listing),
        "--os",
        "linux",
        "--arch",
        "arm64",
        config=upstream_config(registry_upstream),
    )

    assert done.returncode == 0, done.stderr
    store = Store(str(root))
    assert store.find_manifest(f"{ns}/multi/arch:1.0").data == index.bytes
    assert store.find_manifest(f"{ns}/multi/arch@{arm64.digest}").data == arm64.bytes
    assert all(store.has_blob(blob.digest[7:]) for blob in arm64.blobs)
    assert not any(store.has_blob(blob.digest[7:]) for blob in amd64.layers)
    assert store.find_manifest(f"{ns}/a/b/c/d/e@{nested.digest}") is not None
    assert all(store.has_blob(blob.digest[7:]) for blob in nested.blobs)


def test_second_load_fetches_and_writes_nothing(
    registry_upstream, archives, root, tmp_path
):
    ns = registry_upstream.namespace
    listing = tmp_path / "images.txt"
    listing.write_text(f"{ns}/single/docker:1\n{ns}/docker/list:2.0\n")
    spec = f"{listing},{archives['docker']},{archives['oci-gz']}"
    config = upstream_config(registry_upstream)
    first = load(root, spec, config=config)
    before, requests = cache_state(root), upstream_requests(registry_upstream)

    again = load(root, spec, config=config)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing to load: 4 images already cached")
    assert cache_state(root) == before
    assert upstream_requests(registry_upstream) == requests


def test_failed_image_in_a_list_is_named_and_the_others_load(
    registry_upstream, root, tmp_path
):
    ns = registry_upstream.namespace
    listing = tmp_path / "images.txt"
    listing.write_text(f"127.0.0.1:9/gone/away:1\n{ns}/single/oci:1\nNot A Reference\n")

    done = load(root, str(listing), config=upstream_config(registry_upstream))

    assert done.returncode == 1
    assert '"127.0.0.1:9/gone/away:1": upstream 127.0.0.1:9: unreachable' in done.stderr
    assert '"Not A Reference"' in done.stderr
    assert "1 image" in done.stdout and "2 failed" in done.stdout
    store = Store(str(root))
    assert store.find_manifest(f"{ns}/single/oci:1") is not None
    assert store.find_manifest("127.0.0.1:9/gone/away:1") is None


def test_missing_tag_in_a_list_does_not_break_the_next_pull(
    registry_upstream, root, tmp_path
):
    ns = registry_upstream.namespace
    listing = tmp_path / "images.txt"
    listing.write_text(f"{ns}/no/such:1\n{ns}/single/oci:1\n")

    done = load(root, str(listing), config=upstream_config(registry_upstream))

    assert f'"{ns}/no/such:1": {ns}/no/such:1 not found upstream' in done.stderr
    assert "loaded 1 image" in done.stdout and "1 failed" in done.stdout


def test_image_whose_blob_fails_leaves_no_manifest(
    registry_upstream_factory, root, tmp_path
):
    image = make_image("blob-gone")
    upstream = registry_upstream_factory({"blob/gone:1": image}, port=0)
    layer = image.layers[0].digest
    blob_file = (
        upstream.storage_path
        / "docker/registry/v2/blobs/sha256"
        / layer[7:9]
        / layer[7:]
        / "data"
    )
    blob_file.unlink()
    listing = tmp_path / "images.txt"
    listing.write_text(f"{upstream.namespace}/blob/gone:1\n")

    done = load(root, str(listing), config=upstream_config(upstream))

    assert done.returncode == 1
    assert "blob/gone:1" in done.stderr
    assert Store(str(root)).manifests() == []


# -- damaged input -----------------------------------------------------------------


def corrupt_a_layer(source: Path, target: Path) -> None:
    """Copy a tarball, replacing the bytes of its largest member (same size)."""
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    largest = max((m for m, data in members if data is not None), key=lambda m: m.size)
    with tarfile.open(target, "w") as tar:
        for member, data in members:
            if member is largest:
                data = b"\0" * member.size
            tar.addfile(member, io.BytesIO(data) if data is not None else None)


def truncate(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def random_bytes(source: Path, target: Path) -> None:
    target.write_bytes(bytes(range(256)) * 64)


def gzip_not_tar(source: Path, target: Path) -> None:
    target.write_bytes(gzip.compress(b"no tar inside " * 100))


@pytest.mark.parametrize(
    "damage", [corrupt_a_layer, truncate, random_bytes, gzip_not_tar]
)
def test_damaged_tarball_fails_with_one_line_and_leaves_the_cache_unchanged(
    archives, root, tmp_path, damage
):
    assert load(root, str(archives["oci"])).returncode == 0
    damaged = tmp_path / "damaged.tar"
    damage(archives["docker"], damaged)
    before = cache_state(root)

    done = load(root, str(damaged))

    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "damaged.tar" in lines[0]
    assert cache_state(root) == before


def test_missing_image_file_is_a_one_line_error(root, tmp_path):
    done = load(root, str(tmp_path / "nowhere.tar"))

    assert done.returncode == 1
    assert done.stderr.strip() == (
        f'ociregistry: image file not found: "{tmp_path / "nowhere.tar"}"'
    )


def test_load_refuses_while_a_server_runs_on_the_root(archives, oci_server, cache_root):
    oci_server()

    done = load(cache_root, str(archives["docker"]))

    assert done.returncode == 1
    assert "in use by a running server" in done.stderr
    assert os.listdir(cache_root / "img") == []


# -- into the air gap ------------------------------------------------------------


def test_air_gapped_server_serves_loaded_images_to_skopeo_and_podman(
    registry_upstream_factory, oci_server, cache_root, tmp_path
):
    content = {
        "carried/list:1": make_image("carried-list"),
        "carried/docker:1": make_image("carried-docker", oci=False),
        "carried/index:1": make_index("carried-index"),
    }
    upstream = registry_upstream_factory(content)
    ns, source = upstream.namespace, f"docker://{upstream.host_port}"
    docker_tar, oci_tar = tmp_path / "docker.tar", tmp_path / "index.tar"
    skopeo_copy(
        f"{source}/carried/docker:1",
        f"docker-archive:{docker_tar}:{ns}/carried/docker:1",
    )
    skopeo_copy(
        f"{source}/carried/index:1",
        f"oci-archive:{oci_tar}:{ns}/carried/index:1",
        "--all",
    )
    listing = tmp_path / "images.txt"
    listing.write_text(f"{ns}/carried/list:1\n")
    loaded = load(
        cache_root,
        f"{listing},{docker_tar},{oci_tar}",
        config=upstream_config(upstream),
    )
    upstream.stop()

    server = oci_server("--air-gapped")
    layouts = {
        name: tmp_path / name.replace("/", "-").replace(":", "-") for name in content
    }
    for name, layout in layouts.items():
        skopeo_copy(f"docker://{server.address}/{ns}/{name}", f"oci:{layout}")
    pulled = podman_pull(f"{server.address}/{ns}/carried/docker:1")

    assert loaded.returncode == 0, loaded.stderr
    assert "loaded 3 images" in loaded.stdout
    for layout in layouts.values():
        assert list((layout / "blobs" / "sha256").iterdir())
    assert pulled.returncode == 0, pulled.stderr


def podman_pull(image: str) -> subprocess.CompletedProcess[str]:
    """Pull with podman into storage of the test's own, removed afterwards."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    # podman refuses a run root path longer than 50 characters.
    state = tempfile.mkdtemp(prefix="ocireg-podman-", dir="/tmp")
    storage = ["--root", f"{state}/root", "--runroot", f"{state}/run"]
    try:
        return subprocess.run(
            ["podman", *storage, "--storage-driver", "vfs", "pull"]
            + ["--tls-verify=false", image],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_serve_preloads_images_before_it_serves(
    registry_upstream, archives, oci_server
):
    ns = registry_upstream.namespace

    server = oci_server("--air-gapped", "--preload-images", str(archives["docker-gz"]))
    response = server.client().request(
        "GET",
        f"{server.url}/v2/{ns}/single/oci/manifests/1",
        headers={"Accept": DOCKER_IMAGE},
    )

    assert response.status == 200
    assert response.headers["Content-Type"] == DOCKER_IMAGE
    assert "preload finished: loaded 1 image" in server.read_log()

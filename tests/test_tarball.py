"""Reading image tarballs: OCI layouts, docker save archives, gzip, damage."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from support.images import Image, ImageIndex, make_image, make_index, sha256_digest

from ociregistry.loader import commit_image
from ociregistry.manifest import DOCKER_IMAGE
from ociregistry.reference import Repository
from ociregistry.store import Store
from ociregistry.tarball import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    Archive,
    ArchiveInvalid,
    archive_images,
    is_tarball,
)

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

Files = list[tuple[str, bytes]]


# -- building archives -----------------------------------------------------------


def tar_bytes(files: Files, links: dict[str, str] | None = None) -> bytes:
    """Return a tar of regular files and symbolic links (name → target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def blob_files(item: Image | ImageIndex) -> Files:
    """Return `blobs/sha256/…` files for an image or index and its images."""
    images = item.images if isinstance(item, ImageIndex) else [item]
    files = [(f"blobs/sha256/{item.digest[7:]}", item.bytes)]
    for image in images:
        files.append((f"blobs/sha256/{image.digest[7:]}", image.bytes))
        for blob in image.blobs:
            files.append((f"blobs/sha256/{blob.digest[7:]}", blob.data))
    return files


def oci_layout(entries: list[tuple[Image | ImageIndex, dict[str, str]]]) -> Files:
    """Return the files of an OCI image layout: blobs, index.json, oci-layout."""
    files: Files = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')]
    manifests = []
    for item, names in entries:
        files += blob_files(item)
        descriptor = item.descriptor()
        if names:
            descriptor["annotations"] = names
        manifests.append(descriptor)
    index = {"schemaVersion": 2, "manifests": manifests}
    files.append(("index.json", json.dumps(index).encode()))
    return list(dict(files).items())


def saved_layers(image: Image) -> list[tuple[str, bytes]]:
    """Return (diff id, uncompressed tar) of each layer, as docker save keeps."""
    layers = []
    for layer in image.layers:
        data = gzip.decompress(layer.data)
        layers.append((sha256_digest(data), data))
    return layers


def docker_save(images: list[tuple[Image, list[str]]]) -> Files:
    """Return the files of a docker save archive, as skopeo writes one."""
    files: Files = []
    entries = []
    for image, tags in images:
        config_name = f"{image.config.digest[7:]}.json"
        files.append((config_name, image.config.data))
        layer_names = []
        for diff_id, data in saved_layers(image):
            layer_names.append(f"{diff_id[7:]}.tar")
            files.append((layer_names[-1], data))
        entries.append({"Config": config_name, "RepoTags": tags, "Layers": layer_names})
    files.append(("manifest.json", json.dumps(entries).encode()))
    return list(dict(files).items())


def legacy_docker_save(image: Image, tags: list[str]) -> tuple[Files, dict[str, str]]:
    """Return files and links of an old docker save: one directory per layer."""
    files: Files = [(f"{image.config.digest[7:]}.json", image.config.data)]
    links = {}
    layer_names = []
    for number, (_, data) in enumerate(saved_layers(image)):
        directory = f"{number:064x}"
        files += [(f"{directory}/VERSION", b"1.0"), (f"{directory}/json", b"{}")]
        if number == 0:
            files.append((f"{directory}/layer.tar", data))
        else:
            files.append((f"shared-{number}.tar", data))
            links[f"{directory}/layer.tar"] = f"../shared-{number}.tar"
        layer_names.append(f"{directory}/layer.tar")
    entry = {
        "Config": files[0][0],
        "RepoTags": tags,
        "Layers": layer_names,
    }
    files.append(("manifest.json", json.dumps([entry]).encode()))
    files.append(("repositories", b"{}"))
    return files, links


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "cache"))


def read(store: Store, path: str) -> tuple[Archive, list]:
    archive = Archive(store, path)
    archive.read(lambda count: None)
    return archive, archive_images(archive)


def cache_files(store: Store) -> list[str]:
    root = Path(store.root)
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and ".locks" not in path.parts
    )


REPO = Repository("registry.example", "team/app")


# -- recognising files -----------------------------------------------------------


def test_is_tarball_recognises_plain_and_gzip_tars_but_not_text(tmp_path):
    plain = write(tmp_path, "a.tar", tar_bytes([("x", b"1")]))
    packed = write(tmp_path, "a.tgz", gzip.compress(tar_bytes([("x", b"1")])))
    listing = write(tmp_path, "images.txt", b"alpine:3.19\n")
    empty = write(tmp_path, "empty", b"")

    assert is_tarball(plain)
    assert is_tarball(packed)
    assert not is_tarball(listing)
    assert not is_tarball(empty)


# -- OCI layouts -----------------------------------------------------------------


def test_oci_layout_image_is_named_by_its_ref_name(tmp_path, store):
    image = make_image("oci-one")
    files = oci_layout([(image, {REF_NAME: "registry.example/team/app:1.0"})])
    path = write(tmp_path, "one.tar", tar_bytes(files))

    archive, images = read(store, path)
    written = commit_image(store, archive, images[0], [(REPO, "1.0")])

    assert [i.names for i in images] == [["registry.example/team/app:1.0"]]
    cached = store.find_manifest("registry.example/team/app:1.0")
    assert cached is not None and cached.data == image.bytes
    assert all(store.has_blob(blob.digest[7:]) for blob in image.blobs)
    assert written == image.size + sum(blob.size for blob in image.blobs)


def test_tag_only_ref_name_is_kept_as_a_tag(tmp_path, store):
    files = oci_layout([(make_image("tag-only"), {REF_NAME: "v2"})])
    path = write(tmp_path, "tag.tar", tar_bytes(files))

    _, images = read(store, path)

    assert images[0].names == []
    assert images[0].tag == "v2"


def test_index_is_cached_with_its_images_by_digest(tmp_path, store):
    index = make_index("oci-index")
    files = oci_layout([(index, {REF_NAME: "registry.example/team/app:multi"})])
    path = write(tmp_path, "index.tar", tar_bytes(files))

    archive, images = read(store, path)
    commit_image(store, archive, images[0], [(REPO, "multi")])

    assert images[0].top.digest == index.digest
    assert store.find_manifest("registry.example/team/app:multi").data == index.bytes
    for image in index.images:
        url = f"registry.example/team/app@{image.digest}"
        assert store.find_manifest(url).data == image.bytes


def test_index_with_one_platform_exported_keeps_the_image_present(tmp_path, store):
    # As `ctr images export` without --all-platforms: the index, and the
    # blobs of one platform only.
    index = make_index("ctr-export")
    amd64, arm64 = index.images
    annotations = {CONTAINERD_NAME: "docker.io/library/ctr:1", REF_NAME: "1"}
    files = oci_layout([(index, annotations)])
    files = [f for f in files if not _belongs_to(f[0], arm64)]
    path = write(tmp_path, "ctr.tar", tar_bytes(files))

    archive, images = read(store, path)

    assert images[0].names == ["docker.io/library/ctr:1"]
    assert images[0].problem == ""
    assert [m.digest for m in images[0].manifests] == [amd64.digest, index.digest]


def _belongs_to(name: str, image: Image) -> bool:
    hexes = {image.digest[7:], *(blob.digest[7:] for blob in image.blobs)}
    return name.rsplit("/", 1)[-1] in hexes


def test_docker_25_save_takes_names_from_manifest_json(tmp_path, store):
    image = make_image("docker-25")
    files = oci_layout([(image, {})])
    entry = {
        "Config": f"blobs/sha256/{image.config.digest[7:]}",
        "RepoTags": ["app:2.5"],
        "Layers": [f"blobs/sha256/{layer.digest[7:]}" for layer in image.layers],
    }
    files.append(("manifest.json", json.dumps([entry]).encode()))
    path = write(tmp_path, "docker25.tar", tar_bytes(files))

    _, images = read(store, path)

    assert images[0].names == ["app:2.5"]
    assert images[0].top.data == image.bytes


def test_member_names_with_dot_slash_are_found(tmp_path, store):
    image = make_image("dot-slash")
    files = [(f"./{name}", data) for name, data in oci_layout([(image, {})])]
    path = write(tmp_path, "dots.tar", tar_bytes(files))

    _, images = read(store, path)

    assert images[0].problem == ""
    assert images[0].top.digest == image.digest


# -- docker save -----------------------------------------------------------------


def test_docker_save_gets_a_docker_manifest_of_its_uncompressed_layers(tmp_path, store):
    image = make_image("docker-save")
    path = write(tmp_path, "save.tar", tar_bytes(docker_save([(image, ["app:1"])])))

    _, images = read(store, path)

    manifest = json.loads(images[0].top.data)
    assert images[0].top.media_type == DOCKER_IMAGE
    assert manifest["mediaType"] == DOCKER_IMAGE
    assert manifest["config"] == {
        "mediaType": DOCKER_CONFIG,
        "size": image.config.size,
        "digest": image.config.digest,
    }
    diff_ids = [diff_id for diff_id, _ in saved_layers(image)]
    assert [layer["digest"] for layer in manifest["layers"]] == diff_ids
    assert {layer["mediaType"] for layer in manifest["layers"]} == {DOCKER_LAYER}
    assert images[0].digest == sha256_digest(images[0].top.data)


def test_docker_save_manifest_digest_is_the_same_on_every_load(tmp_path):
    image = make_image("stable")
    path = write(tmp_path, "s.tar", tar_bytes(docker_save([(image, ["app:1"])])))

    _, first = read(Store(str(tmp_path / "one")), path)
    _, second = read(Store(str(tmp_path / "two")), path)

    assert first[0].digest == second[0].digest
    assert first[0].top.data == second[0].top.data


def test_legacy_docker_save_follows_layer_links(tmp_path, store):
    image = make_image("legacy", layer_sizes=(100, 200, 300))
    files, links = legacy_docker_save(image, ["legacy:1"])
    path = write(tmp_path, "legacy.tar", tar_bytes(files, links))

    archive, images = read(store, path)
    commit_image(store, archive, images[0], [(REPO, "legacy")])

    assert images[0].problem == ""
    for diff_id, _ in saved_layers(image):
        assert store.has_blob(diff_id[7:])


def test_layer_that_is_not_its_configs_diff_id_is_refused(tmp_path, store):
    image = make_image("diff-id")
    files = docker_save([(image, ["app:1"])])
    layer_name = next(name for name, _ in files if name.endswith(".tar"))
    other = tar_bytes([("other", b"other bytes")])
    files = [(name, data) for name, data in files if name != layer_name]
    manifest = json.loads(dict(files)["manifest.json"])
    manifest[0]["Layers"][0] = "other/layer.tar"
    files = [(n, d) for n, d in files if n != "manifest.json"]
    files += [
        ("other/layer.tar", other),
        ("manifest.json", json.dumps(manifest).encode()),
    ]
    path = write(tmp_path, "diff.tar", tar_bytes(files))

    _, images = read(store, path)

    assert "diff id" in images[0].problem


def test_multi_image_docker_save_names_each_image(tmp_path, store):
    first, second = make_image("first"), make_image("second")
    files = docker_save([(first, ["first:1"]), (second, ["second:1", "second:2"])])
    path = write(tmp_path, "two.tar", tar_bytes(files))

    _, images = read(store, path)

    assert [image.names for image in images] == [
        ["first:1"],
        ["second:1", "second:2"],
    ]


# -- compression, damage, idempotence --------------------------------------------


def test_gzip_archive_reads_like_the_plain_one(tmp_path, store):
    files = oci_layout([(make_image("packed"), {REF_NAME: "a.example/b:1"})])
    plain = write(tmp_path, "p.tar", tar_bytes(files))
    packed = write(tmp_path, "p.tar.gz", gzip.compress(tar_bytes(files)))

    _, from_plain = read(store, plain)
    _, from_packed = read(store, packed)

    assert from_plain[0].top.digest == from_packed[0].top.digest
    assert from_packed[0].problem == ""


def test_blob_with_wrong_bytes_fails_only_the_image_using_it(tmp_path, store):
    good, bad = make_image("good"), make_image("bad")
    files = oci_layout(
        [(good, {REF_NAME: "a.example/good:1"}), (bad, {REF_NAME: "a.example/bad:1"})]
    )
    layer = f"blobs/sha256/{bad.layers[0].digest[7:]}"
    files = [
        (name, b"X" * len(data) if name == layer else data) for name, data in files
    ]
    path = write(tmp_path, "mixed.tar", tar_bytes(files))

    archive, images = read(store, path)

    problems = {image.names[0]: image.problem for image in images}
    assert problems["a.example/good:1"] == ""
    assert "does not match its digest" in problems["a.example/bad:1"]
    assert layer in problems["a.example/bad:1"]
    assert not os.path.exists(store.blob_path(bad.layers[0].digest[7:]))


def test_truncated_archive_is_unreadable_and_leaves_no_temporary_files(tmp_path, store):
    image = make_image("truncated", layer_sizes=(200_000,))
    whole = tar_bytes(oci_layout([(image, {REF_NAME: "a.example/t:1"})]))
    path = write(tmp_path, "cut.tar", whole[: len(whole) // 2])
    archive = Archive(store, path)

    with pytest.raises(ArchiveInvalid, match="not a readable tarball"):
        archive.read(lambda count: None)
    archive.discard()

    assert cache_files(store) == []


def test_archive_without_index_or_manifest_is_not_an_image_tarball(tmp_path, store):
    path = write(tmp_path, "other.tar", tar_bytes([("README", b"hello")]))
    archive = Archive(store, path)
    archive.read(lambda count: None)

    with pytest.raises(ArchiveInvalid, match="not an image tarball"):
        archive_images(archive)


def test_missing_layer_is_a_problem_of_its_image(tmp_path, store):
    image = make_image("missing-layer")
    layer = f"blobs/sha256/{image.layers[1].digest[7:]}"
    files = [
        f for f in oci_layout([(image, {REF_NAME: "a.example/m:1"})]) if f[0] != layer
    ]
    path = write(tmp_path, "missing.tar", tar_bytes(files))

    _, images = read(store, path)

    assert images[0].problem == f"blob {image.layers[1].digest} is not in the archive"


def test_second_commit_of_the_same_archive_changes_nothing(tmp_path, store):
    image = make_image("again")
    path = write(tmp_path, "again.tar", tar_bytes(oci_layout([(image, {})])))
    archive, images = read(store, path)
    commit_image(store, archive, images[0], [(REPO, "again")])
    archive.discard()
    before = cache_state(store)

    archive, images = read(store, path)
    written = commit_image(store, archive, images[0], [(REPO, "again")])
    archive.discard()

    assert written == 0
    assert cache_state(store) == before


def cache_state(store: Store) -> dict[str, tuple[int, int]]:
    root = Path(store.root)
    return {
        name: ((root / name).stat().st_size, (root / name).stat().st_mtime_ns)
        for name in cache_files(store)
    }


def test_discard_removes_every_staged_file(tmp_path, store):
    path = write(tmp_path, "d.tar", tar_bytes(oci_layout([(make_image("d"), {})])))
    archive, _ = read(store, path)

    archive.discard()

    assert cache_files(store) == []

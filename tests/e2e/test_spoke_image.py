"""The dstack spoke image (image/build.py): built offline from Debian packages, the same digest
on every build of the same recipe, and holding what the entrypoint runs and nothing of a node's.

One fresh build here (debootstrap from the machine's Debian mirror, .deb files cached), compared
with the lab's own build of the same recipe (lab/cvm.py: the image the lab's dstack spoke runs;
made by an earlier module, or here).
"""
from __future__ import annotations

import io
import json
import tarfile
import time

import pytest

from conftest import need_root, need_tool
from image import build
from lab import cvm, packages
from lab.hosts import default_lab_dir
from components import render
from components.nodes import dstack


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    need_root("debootstrap and buildah")
    for tool in ("debootstrap", "buildah"):
        need_tool(tool)
    cache = default_lab_dir() / "cache"
    lab_archive, lab_digest = cvm.spoke_image(cache)
    out = tmp_path_factory.mktemp("spoke-image")
    t0 = time.monotonic()
    digest = build.build(out, packages.debian_mirror(build.SUITE), debs=cache / "spoke-image-debs")
    print(f"\nspoke image: a fresh build took {time.monotonic() - t0:.1f}s: {digest}")
    return {"archive": out / build.ARCHIVE, "digest": digest, "lab_digest": lab_digest}


def blob(tar: tarfile.TarFile, digest: str) -> bytes:
    return tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}").read()


def test_a_fresh_build_has_the_digest_of_the_labs_build(built):
    assert built["digest"] == built["lab_digest"]
    assert build.archive_digest(built["archive"]) == built["digest"]


def test_the_image_holds_the_tools_our_two_files_and_no_package_lists(built):
    with tarfile.open(built["archive"]) as tar:
        (manifest_ref,) = json.load(tar.extractfile("index.json"))["manifests"]
        manifest = json.loads(blob(tar, manifest_ref["digest"]))
        config = json.loads(blob(tar, manifest["config"]["digest"]))
        (layer,) = manifest["layers"]
        assert layer["mediaType"].endswith("tar+gzip")
        rootfs = tarfile.open(fileobj=io.BytesIO(blob(tar, layer["digest"])), mode="r:gz")
    assert config["config"]["Entrypoint"] == [build.ENTRYPOINT]
    assert config["config"]["Labels"]["dstack-vpn.bundle"] == str(dstack.IMAGE_BUNDLES[-1])
    assert config["created"].startswith("2023-11-14")  # SOURCE_DATE_EPOCH, not the build's time
    members = {m.name.lstrip("./"): m for m in rootfs.getmembers()}
    entrypoint = members[build.ENTRYPOINT.lstrip("/")]
    assert entrypoint.mode & 0o777 == 0o755 and (entrypoint.uid, entrypoint.gid) == (0, 0)
    assert rootfs.extractfile(entrypoint).read().decode() == build.files()[build.ENTRYPOINT][1]
    status = rootfs.extractfile(members[dstack.STATUS_PROGRAM.lstrip("/")]).read().decode()
    assert status == render.status_program()
    # every file of the layer has the fixed time: nothing of the day it was built
    assert {m.mtime for m in members.values()} == {build.SOURCE_DATE_EPOCH}
    for tool in ("usr/bin/wg", "usr/bin/wireguard-go", "usr/sbin/nft", "usr/bin/python3", "usr/bin/setpriv"):
        assert tool in members, tool
    installed = rootfs.extractfile(members["var/lib/dpkg/status"]).read().decode()
    for name in build.PACKAGES:
        assert f"Package: {name}\nStatus: install ok installed" in installed, name
    # nothing fetched at build time stays in the image
    assert not [n for n in members if n.startswith(("var/lib/apt/lists/", "var/cache/apt/archives/")) and
                members[n].isfile()]

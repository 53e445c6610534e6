"""The dstack spoke's image: Debian packages, the entrypoint and the status program, nothing else.

Built offline and reproducibly (no Dockerfile, no registry): debootstrap of Debian 12 with the
tools the entrypoint runs, our two files, then buildah from scratch with every timestamp set to
SOURCE_DATE_EPOCH. The same package versions give the same manifest digest on every build, so a
compose file that names the image by digest (`image@sha256:...`) names exactly this code.

    python3 -m image.build --out DIR                  # DIR/spoke.oci.tar; prints the digest
    python3 -m image.build --out DIR --push REGISTRY/NAME[:TAG]
                                                      # then pushes it unchanged; prints NAME@sha256:...
    python3 -m image.build --recipe                   # {"key": a hash of what it is made from, "suite", "archive"}

From the repository's root, as root, on Debian or Ubuntu with debootstrap, buildah and skopeo
(README: "The spoke image").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from components import render
from components.nodes import dstack
from components.roles import wireguard

SUITE = "bookworm"
# What the entrypoint runs: the packages a dstack spoke's roles declare (WireGuard, kernel or
# userspace; nftables; the status program's python3) and the kind's own (iproute2). setpriv
# is util-linux's, in every Debian.
PACKAGES = tuple(dstack.image_packages())
ENTRYPOINT = "/usr/local/bin/dstack-vpn-spoke"
NAME = "dstack-vpn-spoke"
# Every file's time, and the image's: the same inputs give the same digest.
SOURCE_DATE_EPOCH = 1700000000
ARCHIVE = "spoke.oci.tar"
# Left by debootstrap and apt, different on every run and of no use in the image; and v2ray's
# own proxy configuration, with a user id its postinst draws at random (the image's v2ray runs
# the compose file's configuration, nothing else).
VOLATILE = ("var/log/*.log", "var/log/apt/*", "var/cache/ldconfig/aux-cache", "var/cache/apt/*.bin",
            "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "dev/*", "run/*",
            "var/cache/debconf/*-old", "var/lib/dpkg/*-old", "etc/v2ray/config.json")


class BuildError(RuntimeError):
    pass


def files() -> dict[str, tuple[int, str]]:
    """Path in the image -> (mode, text): what dstack-vpn adds to the Debian tree."""
    return {
        ENTRYPOINT: (0o755, render.render("dstack/entrypoint.sh", key_dir=dstack.KEY_DIR,
                                          status_program=dstack.STATUS_PROGRAM, bundles=dstack.IMAGE_BUNDLES,
                                          **wireguard.watchdog_values())),
        dstack.STATUS_PROGRAM: (0o644, render.status_program()),
        wireguard.WATCHDOG: (0o755, render.render("wireguard/watchdog.sh", **wireguard.watchdog_values())),
    }


def recipe() -> dict:
    """Everything the image is made from but the mirror's package versions (a cache key)."""
    return {"suite": SUITE, "packages": list(PACKAGES), "epoch": SOURCE_DATE_EPOCH, "entrypoint": ENTRYPOINT,
            "files": {path: [mode, hashlib.sha256(text.encode()).hexdigest()] for path, (mode, text) in files().items()},
            "builder": Path(__file__).read_text()}


def recipe_key() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:12]


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(map(str, argv[:4]))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def engine_env(work: Path) -> dict[str, str]:
    """buildah's and skopeo's settings: storage, runtime and temporary files under `work`, so
    the machine's /etc/containers and /var/lib/containers stay as they are."""
    (work / "run" / "tmp").mkdir(parents=True, exist_ok=True)
    conf, storage = work / "containers.conf", work / "storage.conf"
    conf.write_text(f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    f'events_logfile_path = "{work}/run/events.log"\nruntime = "runc"\n'
                    f'tmp_dir = "{work}/run/libpod-tmp"\nstatic_dir = "{work}/storage/libpod"\n'
                    f'volume_path = "{work}/storage/volumes"\n[network]\nnetwork_config_dir = "{work}/conf/networks"\n')
    storage.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "{work}/run/storage"\ngraphroot = "{work}/storage"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage),
            "TMPDIR": str(work / "run" / "tmp"), "BUILDAH_ISOLATION": "chroot"}


def rootfs(target: Path, mirror: str, debs: Path | None = None) -> None:
    """The Debian tree: debootstrap minbase with PACKAGES, volatile files taken out."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES)]
    if debs is not None:
        debs.mkdir(parents=True, exist_ok=True)
        argv.append(f"--cache-dir={debs}")
    _run([*argv, SUITE, target, mirror], env=env)
    for pattern in VOLATILE:
        for path in target.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for path, (mode, text) in files().items():
        dest = target / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        dest.chmod(mode)


def commit(tree: Path, out: Path, work: Path) -> str:
    """buildah from scratch with `tree` as its one layer; writes the OCI archive `out` and
    returns its manifest digest (sha256:...)."""
    env = engine_env(work)
    ctr = _run(["buildah", "from", "scratch"], env=env).stdout.strip()
    try:
        mnt = _run(["buildah", "mount", ctr], env=env).stdout.strip()
        pack = subprocess.Popen(["tar", "-C", tree, "--numeric-owner", "--xattrs", "-cf", "-", "."],
                                stdout=subprocess.PIPE)
        _run(["tar", "-C", mnt, "--numeric-owner", "--xattrs", "-xpf", "-"], stdin=pack.stdout)
        if pack.wait() != 0:
            raise BuildError("tar of the image tree failed")
        _run(["buildah", "umount", ctr], env=env)
        _run(["buildah", "config", "--entrypoint", json.dumps([ENTRYPOINT]), "--cmd", "[]",
              "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--env", "LANG=C.UTF-8",
              "--stop-signal", "TERM",
              "--label", f"org.opencontainers.image.title={NAME}",
              "--label", "org.opencontainers.image.description=dstack-vpn spoke: WireGuard, its firewall, the status page",
              "--label", f"dstack-vpn.bundle={dstack.IMAGE_BUNDLES[-1]}",
              "--os", "linux", "--arch", "amd64", ctr], env=env)
        out.unlink(missing_ok=True)
        _run(["buildah", "commit", "-q", "--timestamp", str(SOURCE_DATE_EPOCH), "--format", "oci",
              "--disable-compression=false", ctr, f"oci-archive:{out}:{NAME}:latest"], env=env)
    finally:
        subprocess.run(["buildah", "rm", ctr], env=env, capture_output=True)
    return archive_digest(out)


def archive_digest(archive: Path) -> str:
    """The manifest digest of an OCI archive's one image (what `name@sha256:...` names)."""
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
    (manifest,) = index["manifests"]
    return manifest["digest"]


def build(out_dir: Path, mirror: str, debs: Path | None = None) -> str:
    """Build the image into out_dir/ARCHIVE; return its digest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dstack-vpn-image-", dir=out_dir) as tmp:
        tree = Path(tmp) / "rootfs"
        rootfs(tree, mirror, debs)
        return commit(tree, out_dir / ARCHIVE, Path(tmp) / "engine")


def push(archive: Path, destination: str, work: Path) -> str:
    """Copy the archive to a registry unchanged (--preserve-digests: no recompression, so the
    digest stays the one built); return destination@digest as a compose file names it."""
    digest = archive_digest(archive)
    name = destination.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    _run(["skopeo", "copy", "--preserve-digests", f"oci-archive:{archive}", f"docker://{destination}"],
         env=engine_env(work))
    return f"{name}@{digest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m image.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for spoke.oci.tar")
    parser.add_argument("--recipe", action="store_true", help="print the recipe's hash (and suite, archive) and stop")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian", help="a Debian mirror")
    parser.add_argument("--debs", type=Path, help="keep downloaded .deb files here for the next build")
    parser.add_argument("--push", metavar="REGISTRY/NAME[:TAG]", help="then push it there, digest unchanged")
    args = parser.parse_args(argv)
    if args.recipe:
        print(json.dumps({"key": recipe_key(), "suite": SUITE, "archive": ARCHIVE}))
        return 0
    if args.out is None:
        parser.error("--out is required")
    if os.geteuid() != 0:
        parser.error("debootstrap and buildah need root")
    try:
        digest = build(args.out, args.mirror, args.debs)
        print(f"{args.out / ARCHIVE}: {digest}")
        if args.push:
            with tempfile.TemporaryDirectory(prefix="dstack-vpn-push-") as tmp:
                print(push(args.out / ARCHIVE, args.push, Path(tmp)))
    except BuildError as err:
        print(f"image.build: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

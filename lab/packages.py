"""What the lab installs: machine packages, the hosts' base image, their apt repository.

The base image stands in for a fresh Ubuntu droplet: systemd, sshd, python3
and little else. There is one per Debian suite: Debian 12 (bookworm) and 13
(trixie) bracket Ubuntu 24.04 (systemd 252/257 around 255, nftables 1.0.6/1.1
around 1.0.9, OpenSSH 9.2/10 around 9.6, Python 3.11/3.13 around 3.12), and
Ubuntu's mirror is not reachable from the lab machines. WireGuard and nftables
are deliberately absent, so that the program's own install step really runs;
it gets them from a local flat apt
repository per suite that the hosts see read-only at REPO_MOUNT (the hosts
have no network beyond the lab underlay).

Both the image and the repository are cached in a lab cache directory, keyed
by a hash of their recipe; they are built in a temporary directory and renamed
into place when complete, so an interrupted build never looks finished.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SUITES = ("bookworm", "trixie")
DEFAULT_SUITE = "bookworm"
# The suite that stands in for a droplet image slug: Debian 13 for "debian-13-*";
# Debian 12 for everything else, Ubuntu's slugs included.
IMAGE_SUITES = {"debian-13": "trixie"}
# Bump when the way the image or the repository is built changes: it is part
# of both cache keys, so the next run rebuilds them.
RECIPE_VERSION = "lab-image-1"

MACHINE_PACKAGES = (
    "debootstrap", "debian-archive-keyring", "systemd-container", "dpkg-dev",
    "socat", "wireguard-tools", "nftables", "openssh-client", "iproute2",
    "iputils-ping",  # probes from the operator namespace
    "stunnel4",  # TLS of the lab's S3 endpoint (lab/objectstore.py)
)
# What a fresh droplet already has (cloud-init aside: the program tolerates
# its absence). No wireguard-tools, wireguard-go or nftables here.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "iproute2",
    "netbase", "procps", "iputils-ping", "ca-certificates", "sudo",
)
ROOT = Path(__file__).resolve().parents[1]
REPO_MOUNT = "/srv/lab-apt"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"  # from debian-archive-keyring

_NONINTERACTIVE = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
_apt_updated = False


def run(argv, *, check=True, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured; errors carry stderr."""
    kwargs.setdefault("capture_output", not ("stdout" in kwargs or "stderr" in kwargs))
    kwargs.setdefault("text", True)
    result = subprocess.run([str(a) for a in argv], **kwargs)
    if check and result.returncode != 0:
        err = (result.stderr or "").strip()[-2000:] if isinstance(result.stderr, str) else ""
        raise RuntimeError(f"{' '.join(map(str, argv[:6]))} ... failed ({result.returncode}): {err}")
    return result


def mounts_under(path: Path) -> list[str]:
    """Mount points in our mount namespace at or below path."""
    base = str(Path(path).resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """rm -rf that first unmounts whatever is mounted below path.

    An interrupted debootstrap leaves /proc and /sys mounted in its target;
    a plain rmtree would walk into them.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    for point in sorted(mounts_under(path), key=len, reverse=True):
        run(["umount", "--lazy", point], check=False)
    if mounts_under(path):
        raise RuntimeError(f"refusing to remove {path}: still has mounts below it")
    shutil.rmtree(path)


def _installed(packages) -> set[str]:
    out = run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ii"]}


def apt_update_once() -> None:
    global _apt_updated
    if not _apt_updated:
        run(["apt-get", "update", "-q"], env=_NONINTERACTIVE)
        _apt_updated = True


def ensure_machine_packages(packages=MACHINE_PACKAGES) -> list[str]:
    """Install on this machine whichever of packages is missing; return those.

    --no-install-recommends matters for systemd-container: its recommends
    would edit the machine's /etc/nsswitch.conf.
    """
    missing = sorted(set(packages) - _installed(packages))
    if missing:
        apt_update_once()
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=_NONINTERACTIVE)
    return missing


def suite_for_image(slug: str | None) -> str:
    """The lab suite a droplet image slug boots (see IMAGE_SUITES)."""
    return next((suite for prefix, suite in IMAGE_SUITES.items() if (slug or "").startswith(prefix)),
                DEFAULT_SUITE)


def _check_suite(suite: str) -> str:
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r}: the lab builds {', '.join(SUITES)}")
    return suite


def _machine_mirror(suite: str) -> str | None:
    """The URI of this machine's 'deb' source for suite, if it lists one."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
            if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                    and fields.get("enabled", ["yes"]) != ["no"] and fields.get("uris")):
                return fields["uris"][0]
    with contextlib.suppress(FileNotFoundError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#")[0]).split()  # drop [options]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    return None


def debian_mirror(suite: str = DEFAULT_SUITE) -> str:
    """The Debian mirror for suite: the one this machine's apt uses for it, or,
    for a suite it does not list (trixie on a bookworm machine), the mirror it
    uses for another Debian suite (a Debian mirror serves every suite).

    Read from deb822 .sources files or the one-line sources.list, never
    written into code.
    """
    for candidate in (suite, *SUITES):
        mirror = _machine_mirror(candidate)
        if mirror:
            return mirror
    raise RuntimeError(f"no 'deb' source for {' or '.join(dict.fromkeys((suite, *SUITES)))} "
                       "in this machine's apt sources")


def _key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _cache_lock(cache_dir: Path):
    """One builder at a time per cache (two lab processes may start together)."""
    cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _building(final: Path):
    """A fresh temporary directory beside final, renamed to final on success."""
    tmp = final.with_name(f".build-{final.name}")
    remove_tree(tmp)  # left by an interrupted build; we hold the lock
    tmp.mkdir(mode=0o755)
    try:
        yield tmp
        tmp.rename(final)
    finally:
        remove_tree(tmp)


def base_image(cache_dir: Path, suite: str = DEFAULT_SUITE) -> Path:
    """The read-only root file system every host of suite overlays; built once per recipe.

    debootstrap checks the suite's Release file against the machine's
    debian-archive-keyring (bookworm's 2023.3+deb12u1 and later carry the
    trixie keys). Returns <cache>/base-<suite>-<key>/rootfs.
    """
    _check_suite(suite)
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    recipe = {"suite": suite, "variant": "minbase", "packages": sorted(BASE_PACKAGES),
              "arch": arch, "version": RECIPE_VERSION}
    final = cache_dir / f"base-{suite}-{_key(recipe)}"
    with _cache_lock(cache_dir):
        if final.is_dir():
            return final / "rootfs"
        with _building(final) as tmp:
            root = tmp / "rootfs"
            with open(tmp / "debootstrap.log", "w") as log:
                result = run(["debootstrap", "--variant=minbase", f"--arch={arch}",
                              "--include=" + ",".join(BASE_PACKAGES), suite, root, debian_mirror(suite)],
                             check=False, stdout=log, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                tail = (tmp / "debootstrap.log").read_text()[-3000:]
                raise RuntimeError(f"debootstrap failed ({result.returncode}):\n{tail}")
            _finish_image(root)
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return final / "rootfs"


def _finish_image(root: Path) -> None:
    """Make the debootstrapped tree look like a droplet image before first boot."""
    # Each host gets its own identity at creation: host keys and machine-id.
    for key in root.glob("etc/ssh/ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    # The hosts have no DNS and no route out; debootstrap copied ours.
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("# lab host: no DNS\n")
    (root / "etc/hostname").write_text("localhost\n")
    # apt sees only the local repository, which needs no network.
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/apt/sources.list").unlink()
    for source in (root / "etc/apt/sources.list.d").iterdir():
        source.unlink()
    (root / "etc/apt/sources.list.d/lab.list").write_text(f"deb [trusted=yes] file:{REPO_MOUNT} ./\n")
    (root / REPO_MOUNT.lstrip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)
    # Like a cloud image: no package lists until the program runs apt-get update.
    for leftover in [*root.glob("var/lib/apt/lists/*"), *root.glob("var/cache/apt/*.bin"),
                     *root.glob("var/cache/apt/archives/*.deb")]:
        if leftover.is_file():
            leftover.unlink()


def host_packages() -> list[str]:
    """What the program's install step may ask apt for inside the hosts: the packages the roles
    declare (`python3 -m components.roles`, run apart: the lab never imports the program)."""
    out = run([sys.executable, "-m", "components.roles"], cwd=ROOT).stdout
    return json.loads(out)["hosts"]


def local_repo(cache_dir: Path, image: Path, packages: list[str], suite: str = DEFAULT_SUITE) -> Path:
    """A flat apt repository of suite with packages and whatever they need beyond the image.

    apt resolves the dependencies against the image's own dpkg status, so the
    repository holds exactly what an install inside a host will ask for. A
    suite this machine's apt lists (bookworm here) comes from the machine's
    package lists; another (trixie) from the same mirror through package lists
    of our own, so the machine's apt configuration and state stay untouched.
    Returns <cache>/apt-<key>/repo, to bind-mount at REPO_MOUNT.
    """
    _check_suite(suite)
    recipe = {"image": image.parent.name, "packages": sorted(packages), "version": RECIPE_VERSION}
    final = cache_dir / f"apt-{_key(recipe)}"
    with _cache_lock(cache_dir):
        if final.is_dir():
            return final / "repo"
        with _building(final) as tmp:
            (tmp / "state").mkdir()
            (tmp / "archives/partial").mkdir(parents=True)
            shutil.copy(image / "var/lib/dpkg/status", tmp / "state/status")
            options = ["-o", f"Dir::State::status={tmp}/state/status",
                       "-o", f"Dir::Cache::archives={tmp}/archives",
                       # keep the machine's own apt caches untouched
                       "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
                       "-o", "APT::Sandbox::User=root"]
            if _machine_mirror(suite):
                apt_update_once()  # the machine's package lists, for resolving
            else:
                options += _private_lists(tmp / "apt", debian_mirror(suite), suite)
                run(["apt-get", "update", "-q", *options], env=_NONINTERACTIVE)
            run(["apt-get", "install", "--download-only", "-y", "-q", "--no-install-recommends",
                 *options, *packages], env=_NONINTERACTIVE)
            repo = tmp / "repo"
            repo.mkdir(mode=0o755)
            for deb in (tmp / "archives").glob("*.deb"):
                os.chmod(deb, 0o644)
                deb.rename(repo / deb.name)
            with open(repo / "Packages", "w") as index:
                run(["dpkg-scanpackages", "--multiversion", ".", "/dev/null"],
                    cwd=repo, stdout=index, stderr=subprocess.DEVNULL)
            for scratch in ("archives", "state", "apt"):
                remove_tree(tmp / scratch)
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return final / "repo"


def _private_lists(apt_dir: Path, mirror: str, suite: str) -> list[str]:
    """apt options for package lists of suite alone, kept in apt_dir: a sources
    list of our own (checked with the machine's Debian keyring), no machine
    sources, preferences or default release."""
    (apt_dir / "lists/partial").mkdir(parents=True)
    (apt_dir / "empty.d").mkdir()
    (apt_dir / "sources.list").write_text(f"deb [signed-by={DEBIAN_KEYRING}] {mirror} {suite} main\n")
    return ["-o", f"Dir::Etc::sourcelist={apt_dir}/sources.list",
            "-o", f"Dir::Etc::sourceparts={apt_dir}/empty.d",
            "-o", f"Dir::Etc::preferences={apt_dir}/preferences",
            "-o", f"Dir::Etc::preferencesparts={apt_dir}/empty.d",
            "-o", f"Dir::State::lists={apt_dir}/lists",
            "-o", "APT::Default-Release=", "-o", "Acquire::Languages=none"]

"""A lab host standing in for a dstack CVM runs its app as dstack does: the rendered compose
file and the app's environment, handed to docker-compose, which has a container engine start
the spoke image by its digest.

The engine is podman (runc, cgroupfs, the overlay driver), driven by docker-compose through
podman's Docker API socket, as dstack's compose drives dockerd. It runs with the CVM's network
namespace (nsenter --net) and nothing else of the CVM: `network_mode: host` is that namespace,
never the machine's own. Every engine command here runs there, for the same reason (`podman
exec` into a host-network container joins the caller's namespace).

The spoke image is built once per recipe (image/build.py) into the lab's cache and loaded into
each lab's engine. The engine keeps its layers under the lab's state folder and everything else
(its database, which holds each container's environment, the app's .env file, its runtime
state) on a tmpfs mounted there: like a CVM's memory, gone with the lab.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import packages
from .packages import run

ROOT = Path(__file__).resolve().parents[1]
IMAGE_NAME = "localhost/dstack-vpn-spoke"
SERVICE = "dstack-vpn"
ENGINE_PACKAGES = ("podman", "buildah", "skopeo", "runc", "conmon", "docker-compose", "debootstrap")
# Docker's default capabilities (podman's lack MKNOD and AUDIT_WRITE...): dstack runs docker.
DOCKER_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                       "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")


class AppError(RuntimeError):
    pass


def _image_build(*args: str) -> str:
    """image/build.py of this checkout, run apart: the lab never imports the program's modules
    (an upgrade test runs an older program in the lab's own process)."""
    return run([sys.executable, "-m", "image.build", *args], cwd=ROOT).stdout.strip()


def spoke_image(cache_dir: Path) -> tuple[Path, str]:
    """The spoke image as an OCI archive in the lab cache, and its digest; built once per
    recipe (the entrypoint, the status program, the package list, the builder)."""
    packages.ensure_machine_packages(ENGINE_PACKAGES)
    recipe = json.loads(_image_build("--recipe"))
    final = cache_dir / f"spoke-image-{recipe['key']}"
    with packages._cache_lock(cache_dir):
        if not (final / "digest").is_file():
            t0 = time.monotonic()
            with packages._building(final) as tmp:
                out = _image_build("--out", str(tmp), "--mirror", packages.debian_mirror(recipe["suite"]),
                                   "--debs", str(cache_dir / "spoke-image-debs"))
                digest = out.rsplit(": ", 1)[1]
                (tmp / "digest").write_text(digest + "\n")
            print(f"[lab] spoke image {digest[:19]} built in {time.monotonic() - t0:.1f}s",
                  file=sys.stderr, flush=True)
    return final / recipe["archive"], (final / "digest").read_text().strip()


class Engine:
    """One lab's container engine: storage, configuration, and the apps it runs, one per CVM host."""

    def __init__(self, lab):
        self.lab = lab
        self.dir = lab.state_dir / "engine"
        self.mem = self.dir / "mem"  # a tmpfs

    # -- setup -------------------------------------------------------------------
    def _prepare(self) -> dict[str, str]:
        if not os.path.ismount(self.mem):
            self.mem.mkdir(mode=0o700, parents=True, exist_ok=True)
            run(["mount", "-t", "tmpfs", "-o", "mode=0700,size=256m", f"{self.lab.prefix}engine", self.mem])
        for sub in ("run", "tmp", "xdg", "apps", "libpod"):
            (self.mem / sub).mkdir(mode=0o700, exist_ok=True)
        conf, storage = self.dir / "containers.conf", self.dir / "storage.conf"
        caps = ", ".join(f'"{c}"' for c in DOCKER_CAPABILITIES)
        conf.write_text(
            "[containers]\n"
            'netns = "none"\n'
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            f"default_capabilities = [{caps}]\n"
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.mem}/events.log"\n'
            'runtime = "runc"\n'
            f'tmp_dir = "{self.mem}/libpod-tmp"\n'
            f'static_dir = "{self.mem}/libpod"\n'
            f'volume_path = "{self.dir}/volumes"\n'
            "[network]\n"
            f'network_config_dir = "{self.dir}/networks"\n')
        storage.write_text(f'[storage]\ndriver = "overlay"\nrunroot = "{self.mem}/run"\n'
                           f'graphroot = "{self.dir}/storage"\n')
        return self.env()

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.dir / "containers.conf"),
                "CONTAINERS_STORAGE_CONF": str(self.dir / "storage.conf"),
                "TMPDIR": str(self.mem / "tmp"), "XDG_RUNTIME_DIR": str(self.mem / "xdg")}

    def _in_cvm(self, host, argv, **kwargs) -> subprocess.CompletedProcess:
        """argv in the CVM host's network namespace, with this engine's settings."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{host.netns}", *argv], env=kwargs.pop("env", self.env()),
                              capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)

    def podman(self, host, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self._in_cvm(host, ["podman", *args], **kwargs)

    def image(self) -> str:
        """The spoke image, loaded into this engine; its reference by digest."""
        archive, digest = spoke_image(self.lab.cache_dir)
        self._prepare()
        reference = f"{IMAGE_NAME}@{digest}"
        have = subprocess.run(["podman", "image", "exists", reference], env=self.env(), capture_output=True)
        if have.returncode != 0:
            run(["skopeo", "copy", "-q", f"oci-archive:{archive}",
                 f"containers-storage:{IMAGE_NAME}:{digest.split(':')[1][:12]}"], env=self.env())
        return reference

    # -- apps ----------------------------------------------------------------------
    def _app_dir(self, host) -> Path:
        return self.mem / "apps" / host.name

    def compose(self, host, *args: str) -> subprocess.CompletedProcess:
        """docker-compose in the app's folder, against podman's Docker API socket, which a
        `podman system service` of the CVM's namespace serves for the length of the command."""
        sock = self.mem / f"{host.name}.sock"
        sock.unlink(missing_ok=True)
        service = subprocess.Popen(["nsenter", f"--net=/run/netns/{host.netns}", "podman", "system", "service",
                                    "--time=0", f"unix://{sock}"], env=self.env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if service.poll() is not None or time.monotonic() > deadline:
                    raise AppError(f"{host.name}: podman's API service did not start")
                time.sleep(0.05)
            return self._in_cvm(host, ["docker-compose", "--no-ansi", "-p", host.name, *args],
                                cwd=self._app_dir(host), timeout=180,
                                env={**self.env(), "DOCKER_HOST": f"unix://{sock}", "COMPOSE_HTTP_TIMEOUT": "120"})
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()

    def start(self, host, compose: str, env_text: str) -> None:
        """`docker-compose up -d` of the app, as dstack runs it: the compose file, and the
        decrypted environment as the project's .env (0600, in the engine's memory)."""
        self.image()
        app = self._app_dir(host)
        app.mkdir(mode=0o700, exist_ok=True)
        (app / "docker-compose.yml").write_text(compose)
        fd = os.open(app / ".env", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(env_text)
        out = self.compose(host, "up", "-d", "--force-recreate", "--remove-orphans")
        if out.returncode != 0:
            raise AppError(f"{host.name}: docker-compose up failed: {(out.stdout + out.stderr).strip()[-2000:]}")

    def stop(self, host) -> None:
        """`docker-compose down`: SIGTERM, then the container and the app's environment go."""
        app = self._app_dir(host)
        if (app / "docker-compose.yml").exists():
            out = self.compose(host, "down", "--remove-orphans")
            if out.returncode != 0:
                raise AppError(f"{host.name}: docker-compose down failed: {(out.stdout + out.stderr).strip()[-2000:]}")
            (app / ".env").unlink(missing_ok=True)

    def inspect(self, host) -> dict | None:
        """podman's view of the app's one container (None: there is none)."""
        if not (self.dir / "storage.conf").exists():
            return None
        out = self.podman(host, "ps", "-a", "--filter", f"label=com.docker.compose.project={host.name}",
                          "--format", "{{.ID}}")
        ids = out.stdout.split()
        if not ids:
            return None
        return json.loads(self.podman(host, "inspect", ids[0]).stdout)[0]

    def running(self, host) -> bool:
        found = self.inspect(host)
        return bool(found and found["State"]["Running"])

    def pid(self, host) -> int:
        """The container's main process, as this machine numbers it."""
        found = self.inspect(host)
        if not found or not found["State"]["Pid"]:
            raise AppError(f"{host.name}: the app is not running")
        return int(found["State"]["Pid"])

    def pids(self, host) -> list[int]:
        """Every process of the container (those in its PID namespace)."""
        ns = os.readlink(f"/proc/{self.pid(host)}/ns/pid")
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "pid") == ns:
                        out.append(int(entry.name))
                except OSError:
                    pass
        return sorted(out)

    def exec(self, host, command: str, **kwargs) -> subprocess.CompletedProcess:
        """`sh -c command` in every namespace of the running container (its mounts, its
        processes, the CVM's network), as root: what `docker exec` gives."""
        return subprocess.run(["nsenter", f"--target={self.pid(host)}", "--all", "sh", "-c", command],
                              capture_output=True, text=True, timeout=kwargs.pop("timeout", 60), **kwargs)

    def logs(self, host) -> str:
        found = self.inspect(host)
        if not found:
            return ""
        out = self.podman(host, "logs", found["Id"])
        return out.stdout + out.stderr

    def upper_dir(self, host) -> Path | None:
        """The container's writable layer: the part of its file system that is on disk."""
        found = self.inspect(host)
        upper = (found or {}).get("GraphDriver", {}).get("Data", {}).get("UpperDir")
        return Path(upper) if upper else None

    # -- teardown ------------------------------------------------------------------
    def close(self) -> None:
        """Every container of this engine removed (SIGKILL), conmon and its cgroups gone,
        the tmpfs unmounted; the layers go with the lab's folder."""
        if not (self.dir / "storage.conf").exists():
            return
        ids = subprocess.run(["podman", "ps", "-a", "-q", "--no-trunc"], env=self.env(), capture_output=True,
                             text=True).stdout.split()
        conmons = [self.mem / "run" / "overlay-containers" / i / "userdata" / "conmon.pid" for i in ids]
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], env=self.env(), capture_output=True, timeout=120)
        for pidfile in conmons:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for cid in ids:
            for cgroup in Path("/sys/fs/cgroup").glob(f"*/libpod_parent/libpod-{cid}"):
                _remove_cgroup(cgroup)
            for cgroup in Path("/sys/fs/cgroup").glob(f"*/libpod_parent/libpod-conmon-{cid}"):
                _remove_cgroup(cgroup)
        for parent in Path("/sys/fs/cgroup").glob("*/libpod_parent"):
            try:
                parent.rmdir()  # only when empty: another lab's engine may use it
            except OSError:
                pass
        packages.remove_tree(self.dir)


def _remove_cgroup(cgroup: Path) -> None:
    for child in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        child.rmdir()
    cgroup.rmdir()

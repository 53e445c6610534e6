"""A lab host's disk before its first boot: its overlay's files (hostname, machine-id, host key,
authorized keys, a sudo user as cloud-init makes one)."""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

from .packages import run


class Disk:
    """A part of lab.hosts.Host: self.upper over the read-only self.image."""

    def _mkdirs(self, rel: str) -> Path:
        """Create upper/rel with each directory's mode and owner copied from the
        image: overlayfs shows the upper directory's, so /root must stay 0700."""
        path, base = self.upper, self.image
        for part in Path(rel).parts:
            path, base = path / part, base / part
            if not path.exists():
                path.mkdir()
                if base.is_dir():
                    st = base.stat()
                    os.chown(path, st.st_uid, st.st_gid)
                    os.chmod(path, st.st_mode & 0o7777)
        return path

    def _write(self, rel: str, text: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        path = self._mkdirs(str(Path(rel).parent)) / Path(rel).name
        path.write_text(text)
        os.chown(path, uid, gid)
        os.chmod(path, mode)

    def _prepare_disk(self, authorized_keys: list[str], host_key_private_openssh: str | None) -> None:
        self.upper.mkdir(mode=0o755)
        self._write("etc/hostname", f"{self.name}\n")
        hosts = (self.image / "etc/hosts").read_text()
        self._write("etc/hosts", f"127.0.1.1\t{self.name}\n" + hosts)
        self._write("etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
        # Host key: as the program hands it over through cloud-init, or new.
        key = self.upper / "etc/ssh/ssh_host_ed25519_key"
        self._mkdirs("etc/ssh")
        if host_key_private_openssh is not None:
            self._write("etc/ssh/ssh_host_ed25519_key", host_key_private_openssh.strip() + "\n", 0o600)
            public = run(["ssh-keygen", "-y", "-f", key], check=False).stdout.strip()
            if not public.startswith("ssh-ed25519 "):
                raise ValueError(f"host {self.name}: host_key_private_openssh is not an "
                                 "unencrypted OpenSSH ed25519 private key")
            self._write("etc/ssh/ssh_host_ed25519_key.pub", f"{public} root@{self.name}\n")
        else:
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}", "-f", key])
        self.host_key_public = " ".join((self.upper / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])
        keys = "".join(k.strip() + "\n" for k in authorized_keys)
        self._write("root/.ssh/authorized_keys", keys, 0o600)
        if self.ssh_user:
            self._add_sudo_user(self.ssh_user, keys)

    def _add_sudo_user(self, user: str, keys: str) -> None:
        """What cloud-init's users: does: a user with our keys and passwordless sudo."""
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", user) or user == "root":
            raise ValueError(f"ssh_user {user!r}: want a plain lower-case user name other than root")
        taken = [int(line.split(":")[2]) for line in (self.image / "etc/passwd").read_text().splitlines()]
        uid = max([999, *(u for u in taken if u < 60000)]) + 1
        days = int(time.time() // 86400)
        for rel, line, mode in (
                ("etc/passwd", f"{user}:x:{uid}:{uid}::/home/{user}:/bin/bash", 0o644),
                ("etc/group", f"{user}:x:{uid}:", 0o644),
                ("etc/shadow", f"{user}:*:{days}:0:99999:7:::", 0o640),
                ("etc/gshadow", f"{user}:!::", 0o640)):
            shadow_gid = (self.image / rel).stat().st_gid
            self._write(rel, (self.image / rel).read_text() + line + "\n", mode, 0, shadow_gid)
        home = f"home/{user}"
        self._mkdirs("home")
        (self.upper / home).mkdir(mode=0o750)
        os.chown(self.upper / home, uid, uid)
        for skel in (self.image / "etc/skel").iterdir():
            self._write(f"{home}/{skel.name}", skel.read_text(), 0o644, uid, uid)
        (self.upper / home / ".ssh").mkdir(mode=0o700)
        os.chown(self.upper / home / ".ssh", uid, uid)
        self._write(f"{home}/.ssh/authorized_keys", keys, 0o600, uid, uid)
        self._write(f"etc/sudoers.d/90-lab-{user}", f"{user} ALL=(ALL) NOPASSWD:ALL\n", 0o440)

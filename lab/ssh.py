"""The lab's one OpenSSH command line: from the operator namespace (the lab's "internet"), no
user or system configuration, a given key and known-hosts file. The lab's own client (Lab.ssh:
its checks and tests) and its stand-in for pulumi-command (Cloud.run_remote) differ only in the
options they pass."""
from __future__ import annotations

from pathlib import Path


def ssh_argv(op_ns: str, key: str | Path, destination: str, command: str, *, port: int = 22,
             known_hosts: str | Path | None = None, options: dict[str, str] | None = None) -> list[str]:
    """`ssh` in op_ns with `key` alone; the host key checked against known_hosts (None: not checked)."""
    opts = {"IdentitiesOnly": "yes", "BatchMode": "yes", "GlobalKnownHostsFile": "/dev/null"}
    if known_hosts is None:
        opts.update(UserKnownHostsFile="/dev/null", StrictHostKeyChecking="no")
    else:
        opts.update(UserKnownHostsFile=str(known_hosts), StrictHostKeyChecking="yes")
    opts.update(options or {})
    argv = ["ip", "netns", "exec", op_ns, "ssh", "-F", "/dev/null", "-i", str(key)]
    for name, value in opts.items():
        argv += ["-o", f"{name}={value}"]
    return argv + (["-p", str(port)] if port != 22 else []) + [destination, command]

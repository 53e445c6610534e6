"""A lab host standing in for a dstack CVM: the bundle's app runs on it as a container
engine would run it, with no SSH used to configure it.

From the compose file: the service's entrypoint argv (`$$` read as `$`, as compose does),
its environment (`${VAR}` and `${VAR:?message}` taken from the app's environment file, as
dstack hands the decrypted environment to compose), `network_mode: host` (the host's own
network), NET_ADMIN (root on the host has it), its tmpfs (under /run, a tmpfs) and
`restart: always` (a transient systemd unit with Restart=always). The environment reaches the
process from a 0600 file under /run, as docker keeps it in the container's own config.
"""
from __future__ import annotations

import re
import subprocess

import yaml

from .hosts import Host

SERVICE = "dstack-vpn"
UNIT = "dstack-vpn-app"
ENV_FILE = "/run/dstack-vpn-lab.env"
# The entrypoint's argv, NUL-separated: systemd would expand `$` in an ExecStart line and
# cannot hold an argument of many lines, so a launcher execs the argv as it is.
ARGV_FILE = "/run/dstack-vpn-lab.argv"
LAUNCHER = 'mapfile -d "" argv <' + ARGV_FILE + '; exec "${argv[@]}"'
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::\?([^}]*))?\}")


class AppError(RuntimeError):
    pass


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines (the bundle's own file: no quoting, no comments but '#' lines)."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation, for the forms the bundle uses."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, message = m.group(1), m.group(2)
        if name not in env or (message is not None and env[name] == ""):
            if message is not None:
                raise AppError(f"required variable {name} is missing a value: {message}")
            return ""
        return env[name]
    return _VAR.sub(one, text)


def container(compose: str, env_text: str) -> tuple[list[str], dict[str, str], dict]:
    """(argv, environment, service) of the bundle's one service."""
    service = yaml.safe_load(compose)["services"][SERVICE]
    env = parse_env_file(env_text)
    argv = [interpolate(a, env) for a in service["entrypoint"]]
    environment = {k: interpolate(str(v), env) for k, v in service.get("environment", {}).items()}
    if service.get("network_mode") != "host" or "NET_ADMIN" not in service.get("cap_add", []):
        raise AppError("the lab runs only the bundle's shape: network_mode host with NET_ADMIN")
    return argv, environment, service


def _in_guest(host: Host, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    pid = host.guest_pid()
    if pid is None:
        raise AppError(f"{host.name} is not running")
    return subprocess.run(["nsenter", "--target", str(pid), "--all", *argv], capture_output=True, text=True,
                          timeout=60, **kwargs)


def start(host: Host, compose: str, env_text: str) -> None:
    """Run the app on `host` (replacing a running one), as `docker compose up` would."""
    argv, environment, service = container(compose, env_text)
    stop(host)
    lines = "".join(f"{k}={v}\n" for k, v in environment.items())
    # the file is made 0600 before the environment goes in
    for path, text in ((ENV_FILE, lines), (ARGV_FILE, "".join(a + "\0" for a in argv))):
        made = _in_guest(host, ["sh", "-c", f"umask 077; cat >{path}"], input=text)
        if made.returncode:
            raise AppError(f"{host.name}: could not write {path}: {made.stderr.strip()}")
    run = _in_guest(host, ["systemd-run", f"--unit={UNIT}", "--property=Restart=always",
                           "--property=RestartSec=2", f"--property=EnvironmentFile={ENV_FILE}",
                           "--property=KillMode=mixed", f"--property=TimeoutStopSec={_seconds(service)}",
                           "--", "/bin/bash", "-c", LAUNCHER.replace("$", "$$")])
    if run.returncode:
        raise AppError(f"{host.name}: the app did not start: {run.stderr.strip()}")


def stop(host: Host) -> None:
    """Stop the app (SIGTERM, as `docker stop`) and forget its environment."""
    if host.guest_pid() is None:
        return
    _in_guest(host, ["systemctl", "stop", f"{UNIT}.service"])
    _in_guest(host, ["systemctl", "reset-failed", f"{UNIT}.service"])
    _in_guest(host, ["rm", "-f", ENV_FILE, ARGV_FILE])


def state(host: Host) -> str:
    """The unit's ActiveState ("active", "activating", "failed", ...)."""
    return _in_guest(host, ["systemctl", "show", "-P", "ActiveState", f"{UNIT}.service"]).stdout.strip()


def _seconds(service: dict) -> str:
    grace = str(service.get("stop_grace_period", "10s"))
    return grace[:-1] if grace.endswith("s") else grace

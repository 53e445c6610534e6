"""The lab's stand-in providers: what each resource type becomes for real.

- a DigitalOcean droplet: a newly booted lab host (its underlay address is
  the droplet's ipv4 address), with the host key and admin keys its
  cloud-init user data carries and the DigitalOcean SSH keys authorised;
- a reserved IP: a free underlay address; its assignment: that address added
  to the droplet's outside interface, moved when the assignment moves;
- a cloud firewall: an nftables table of its own (`inet lab_cloud_firewall`)
  on the host's outside interface in its namespace, stateful like the real one;
- a `command:remote:Command`: real SSH with the connection the program declared
  (host, port, user, private key, host key when pinned), stdin and exit code;
- a key (dynamic resource): the program's own provider code, as Pulumi runs it.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import secrets
import shlex
import socket
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from . import diffs
from .engine import Engine, Record
from .underlay import UNDERLAY
from .packages import suite_for_image
from .ssh import ssh_argv

if TYPE_CHECKING:
    from .hosts import Lab

# Disk of a few droplet sizes (GB), as DigitalOcean lists them: what a resize with resize_disk grows to.
SIZE_DISK_GB = {"s-1vcpu-512mb-10gb": 10, "s-1vcpu-1gb": 25, "s-1vcpu-2gb": 50, "s-2vcpu-2gb": 60,
                "s-2vcpu-4gb": 80, "s-4vcpu-8gb": 160}
RESERVED_IP_FIRST = 200  # reserved IPs come from .200 up; hosts from .10 up
CLOUD_FW_TABLE = "lab_cloud_firewall"


class CommandError(RuntimeError):
    pass


class Base:
    def __init__(self, cloud: "Cloud"):
        self.cloud = cloud

    def diff(self, old: Record, inputs: dict) -> str:
        return diffs.diff(old.type, old.inputs, old.outputs, inputs)

    def update(self, urn: str, old: Record, inputs: dict) -> dict:
        return {**old.outputs, **inputs}

    def delete(self, old: Record) -> None:
        pass

    def read(self, old: Record) -> Record | None:
        return old


class Droplets(Base):
    def read(self, old):  # a droplet deleted in the console is gone
        return old if old.outputs.get("labHost") in self.cloud.lab.hosts else None

    def create(self, urn, inputs):
        lab = self.cloud.lab
        data = yaml.safe_load(inputs.get("userData") or "") or {}
        host_key = (data.get("ssh_keys") or {}).get("ed25519_private")
        authorized = [self.cloud.account.public_key(i) for i in inputs.get("sshKeys", [])]
        authorized += list(data.get("ssh_authorized_keys") or [])
        droplet_id = str(100_000_000 + secrets.randbelow(900_000_000))
        # Lab host names are unique; a replacement runs beside the droplet it replaces.
        name = f"{inputs['name'][:22]}-{droplet_id[-6:]}"
        # The image slug picks the Debian release the host runs (debian-13-* trixie, else bookworm).
        host = lab.host(name, authorized_keys=authorized, host_key_private_openssh=host_key,
                        suite=suite_for_image(inputs.get("image")))
        host.boot()
        host.wait_ssh(timeout=120)
        return droplet_id, {**inputs, "id": droplet_id, "ipv4Address": host.address, "status": "active",
                            "labHost": name}

    def update(self, urn, old, inputs):
        outputs = {**old.outputs, **inputs}
        if old.inputs.get("size") != inputs.get("size"):
            outputs["diskGb"] = self._resize(old, inputs)
        return outputs

    def _resize(self, old, inputs) -> int | None:
        """As DigitalOcean's provider resizes: a hard power-off, the resize action, power on. A disk
        that grew (resize_disk, true unless the program says otherwise) never shrinks again."""
        host = self.cloud.lab.hosts[old.outputs["labHost"]]
        disk = old.outputs.get("diskGb") or SIZE_DISK_GB.get(old.inputs.get("size"))
        want = SIZE_DISK_GB.get(inputs["size"])
        host.power_cut()
        try:
            if disk is not None and want is not None and want < disk:
                raise CommandError(f"Error resizing droplet ({old.id}): POST .../v2/droplets/{old.id}/actions: 422 "
                                   f"the droplet's disk ({disk} GB) is larger than {inputs['size']}'s ({want} GB)")
            if inputs.get("resizeDisk", True) and want is not None:
                disk = max(disk or 0, want)
        finally:
            host.boot()
            host.wait_ssh(timeout=120)
        return disk

    def delete(self, old):
        host = self.cloud.lab.hosts.get(old.outputs["labHost"])
        if host is not None:
            host.destroy()


class ReservedIps(Base):
    def create(self, urn, inputs):
        used = self.cloud.used_addresses()
        free = (str(UNDERLAY[i]) for i in range(RESERVED_IP_FIRST, UNDERLAY.num_addresses - 1))
        ip = next(a for a in free if a not in used)
        return ip, {**inputs, "ipAddress": ip, "urn": urn}


class Assignments(Base):
    def read(self, old):  # DigitalOcean's read: gone unless the address is on that droplet
        host = self.cloud.droplet_host(old.inputs["dropletId"], missing_ok=True)
        return old if host is not None and old.inputs["ipAddress"] in host.extra_addresses else None

    def create(self, urn, inputs):
        host = self.cloud.droplet_host(inputs["dropletId"])
        # Assigning a reserved IP moves it, as DigitalOcean's assign action does.
        for other in self.cloud.lab.hosts.values():
            if inputs["ipAddress"] in other.extra_addresses:
                other.remove_address(inputs["ipAddress"])
        host.add_address(inputs["ipAddress"])
        return f"{inputs['ipAddress']}-{inputs['dropletId']}", dict(inputs)

    def delete(self, old):
        host = self.cloud.droplet_host(old.inputs["dropletId"], missing_ok=True)
        if host is not None and old.inputs["ipAddress"] in host.extra_addresses:
            host.remove_address(old.inputs["ipAddress"])


class Firewalls(Base):
    """Stateful like DigitalOcean's: inbound only what a rule allows, replies always."""

    def read(self, old):  # droplet_ids as the API lists them: a deleted droplet is not among them
        ids = [i for i in old.inputs.get("dropletIds", []) if self.cloud.droplet_host(i, missing_ok=True)]
        if ids == old.inputs.get("dropletIds", []):
            return old
        return Record(**{**old.__dict__, "inputs": {**old.inputs, "dropletIds": ids},
                         "outputs": {**old.outputs, "dropletIds": ids}})

    def _ruleset(self, inputs) -> str:
        lines = [f"table inet {CLOUD_FW_TABLE}", f"delete table inet {CLOUD_FW_TABLE}",
                 f"table inet {CLOUD_FW_TABLE} {{", "\tchain input {",
                 "\t\ttype filter hook input priority -10; policy accept;",
                 '\t\tiifname != "eth0" accept', "\t\tct state established,related accept"]
        for rule in inputs.get("inboundRules", []):
            proto, ports = rule["protocol"], rule.get("portRange", "")
            for src in rule.get("sourceAddresses", []):
                family = "ip" if ipaddress.ip_network(src).version == 4 else "ip6"
                match = f"{family} saddr {src}"
                if proto == "icmp":
                    lines.append(f"\t\t{match} meta l4proto {{ icmp, ipv6-icmp }} accept")
                else:
                    lines.append(f"\t\t{match} {proto} dport {ports} accept")
        lines += ["\t\tdrop", "\t}", "}"]
        return "\n".join(lines) + "\n"

    def _apply(self, inputs) -> None:
        for droplet_id in inputs.get("dropletIds", []):
            host = self.cloud.droplet_host(droplet_id)
            host.nft(["-f", "-"], input=self._ruleset(inputs), text=True, check=True)

    def create(self, urn, inputs):
        self._apply(inputs)
        return f"fw-{zlib.crc32(urn.encode())}", dict(inputs)

    def update(self, urn, old, inputs):
        for droplet_id in set(old.inputs.get("dropletIds", [])) - set(inputs.get("dropletIds", [])):
            self._remove(droplet_id)
        self._apply(inputs)
        return {**old.outputs, **inputs}

    def _remove(self, droplet_id) -> None:
        host = self.cloud.droplet_host(droplet_id, missing_ok=True)
        if host is not None and host.running:
            host.nft(["delete", "table", "inet", CLOUD_FW_TABLE])

    def delete(self, old):
        for droplet_id in old.inputs.get("dropletIds", []):
            self._remove(droplet_id)


class SshKeys(Base):
    """Keys on the account, shared by every stack of the lab as DigitalOcean's are by every stack
    on one account: the same public key twice is refused with DigitalOcean's own answer."""

    def create(self, urn, inputs):
        key_id, fingerprint = self.cloud.account.add_key(inputs["name"], inputs["publicKey"])
        return key_id, {**inputs, "fingerprint": fingerprint}

    def update(self, urn, old, inputs):  # a new name: renamed in place
        self.cloud.account.rename_key(old.id, inputs["name"])
        return {**old.outputs, **inputs}

    def delete(self, old):
        self.cloud.account.remove_key(old.id)


class Account:
    """The lab's DigitalOcean account: its SSH keys (a JSON file in the lab's state directory)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def _save(self, keys: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(keys, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def add_key(self, name: str, public_line: str) -> tuple[str, str]:
        """(id, fingerprint) of a newly uploaded key."""
        keys = self._load()
        fingerprint = md5_fingerprint(public_line)
        if any(k["fingerprint"] == fingerprint for k in keys.values()):
            raise CommandError("Error creating SSH Key: POST https://api.digitalocean.com/v2/account/keys: 422 "
                               "SSH Key is already in use on your account")
        key_id = str(10_000_000 + zlib.crc32(public_line.split()[1].encode()) % 90_000_000)
        keys[key_id] = {"name": name, "public_key": public_line.strip(), "fingerprint": fingerprint}
        self._save(keys)
        return key_id, fingerprint

    def rename_key(self, key_id: str, name: str) -> None:
        keys = self._load()
        keys[key_id]["name"] = name
        self._save(keys)

    def remove_key(self, key_id: str) -> None:
        keys = self._load()
        if keys.pop(str(key_id), None) is None:
            raise CommandError(f"Error deleting SSH key: DELETE .../v2/account/keys/{key_id}: 404 not found")
        self._save(keys)

    def public_key(self, id_or_fingerprint) -> str:
        """What a droplet's ssh_keys entry (an id, or a fingerprint) names, as DigitalOcean resolves it."""
        for key_id, key in self._load().items():
            if str(id_or_fingerprint) in (key_id, key["fingerprint"]):
                return key["public_key"]
        raise CommandError(f"Error creating droplet: POST .../v2/droplets: 422 ssh_keys: {id_or_fingerprint} "
                           "is not a key on your account")


def md5_fingerprint(public_line: str) -> str:
    digest = hashlib.md5(base64.b64decode(public_line.split()[1]), usedforsecurity=False).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, 32, 2))


class Tags(Base):
    def create(self, urn, inputs):
        return inputs["name"], dict(inputs)


class DynamicKeys(Base):
    """Runs the program's own dynamic provider (unpickled from its inputs)."""

    def create(self, urn, inputs):
        provider = diffs.load_provider(inputs)
        result = provider.create({k: v for k, v in inputs.items() if k != diffs.PROVIDER_KEY})
        return result.id, {**(result.outs or {}), diffs.PROVIDER_KEY: inputs[diffs.PROVIDER_KEY]}

    def delete(self, old):
        """As Pulumi's provider host deletes: the provider unpickled from the old outputs (a state
        whose provider reference no longer loads cannot delete its keys)."""
        provider = diffs.load_provider(old.outputs)
        provider.delete(old.id, {k: v for k, v in old.outputs.items() if k != diffs.PROVIDER_KEY})


class Commands(Base):
    """pulumi-command's remote Command, over real SSH from the operator namespace."""

    def create(self, urn, inputs):
        out = self.cloud.run_remote(urn, inputs, inputs["create"], inputs.get("stdin"))
        return f"cmd-{secrets.token_hex(4)}", {**inputs, **out}

    def update(self, urn, old, inputs):
        out = self.cloud.run_remote(urn, inputs, inputs.get("update") or inputs["create"], inputs.get("stdin"))
        return {**old.outputs, **inputs, **out}

    def delete(self, old):
        if old.inputs.get("delete"):
            self.cloud.run_remote(old.urn, old.inputs, old.inputs["delete"], None)


def agent_socket_check(path: str | None) -> None:
    """pulumi-command dials the agent named by SSH_AUTH_SOCK (or agentSocketPath) before every
    connection, and a dead one fails the step at once, outside its dial retries."""
    if not path:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        reason = "no such file or directory" if isinstance(err, FileNotFoundError) else "connection refused"
        raise CommandError(f"dial unix {path}: connect: {reason}") from None
    finally:
        sock.close()


class Cloud:
    def __init__(self, lab: "Lab", engine_state=None, log=print):
        self.lab = lab
        self.state = engine_state
        self.log = log
        self.account = Account(lab.state_dir / "digitalocean-account.json")

    def providers(self) -> dict:
        return {
            "digitalocean:index/droplet:Droplet": Droplets(self),
            "digitalocean:index/reservedIp:ReservedIp": ReservedIps(self),
            "digitalocean:index/reservedIpAssignment:ReservedIpAssignment": Assignments(self),
            "digitalocean:index/firewall:Firewall": Firewalls(self),
            "digitalocean:index/sshKey:SshKey": SshKeys(self),
            "digitalocean:index/tag:Tag": Tags(self),
            diffs.DYNAMIC: DynamicKeys(self),
            diffs.COMMAND: Commands(self),
        }

    def engine(self, state_path: Path, log=print) -> Engine:
        engine = Engine(state_path, self.providers(), log=log)
        self.state = engine.state
        return engine

    # -- lookups in the engine's state ----------------------------------------
    def _records(self, typ: str) -> list[Record]:
        return [r for r in list(self.state.records.values()) if r.type == typ]

    def droplet_host(self, droplet_id, missing_ok: bool = False):
        for r in self._records("digitalocean:index/droplet:Droplet"):
            if r.id == str(droplet_id):
                return self.lab.hosts.get(r.outputs["labHost"])
        if missing_ok:
            return None
        raise KeyError(f"no droplet {droplet_id} in the lab")

    def used_addresses(self) -> set[str]:
        used = {r.outputs["ipAddress"] for r in self._records("digitalocean:index/reservedIp:ReservedIp")}
        for host in self.lab.hosts.values():
            used |= {host.address, *host.extra_addresses}
        return used

    # -- SSH as pulumi-command does it ------------------------------------------
    def run_remote(self, urn: str, inputs: dict, command: str, stdin: str | None) -> dict:
        conn = inputs["connection"]
        name = urn.split("::")[-1]
        host, port, user = conn["host"], int(conn.get("port", 22)), conn.get("user", "root")
        agent_socket_check(conn.get("agentSocketPath") or os.environ.get("SSH_AUTH_SOCK"))
        limit = int(conn.get("dialErrorLimit", 10))
        timeout = int(conn.get("perDialTimeout", 15))
        with tempfile.TemporaryDirectory(prefix="lab-ssh-") as tmp:  # 0700
            key = Path(tmp) / "key"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(conn["privateKey"])
            # LogLevel INFO: OpenSSH reports a failed negotiation (e.g. no common host key
            # algorithm) at that level only.
            options = {"ConnectTimeout": str(timeout), "LogLevel": "INFO", "ServerAliveInterval": "5",
                       "ServerAliveCountMax": "6"}
            known = None
            if conn.get("hostKey"):
                known = Path(tmp) / "known_hosts"
                target = host if port == 22 else f"[{host}]:{port}"
                known.write_text(f"{target} {conn['hostKey']}\n")
                # pulumi-command offers the server only the pinned key's own type (Go's
                # publicKey.Type(): `ssh-rsa` means SHA-1 RSA), not OpenSSH's negotiated list.
                options["HostKeyAlgorithms"] = conn["hostKey"].split()[0]
            env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (inputs.get("environment") or {}).items())
            argv = ssh_argv(self.lab.op_ns, key, f"{user}@{host}", f"env {env_prefix} {command}" if env_prefix else command,
                            port=port, known_hosts=known, options=options)
            for dial in range(1, limit + 2):
                proc = subprocess.run(argv, input=stdin or "", capture_output=True, text=True, timeout=900)
                # ssh says 255 for its own failures (refused, unreachable, host key): dial again
                if proc.returncode != 255 or dial > limit or "REMOTE HOST IDENTIFICATION" in proc.stderr \
                        or "Host key verification failed" in proc.stderr:
                    break
                time.sleep(min(0.5 * dial, 3))
        if inputs.get("logging") != "none":  # as pulumi-command: no output where keys flow
            for line in proc.stdout.splitlines() + proc.stderr.splitlines():
                self.log(f"    {name}: {line}")
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise CommandError(f"{name} on {user}@{host}:{port} exited {proc.returncode}: {tail}")
        return {"stdout": proc.stdout, "stderr": proc.stderr}

"""The example network on lab hosts: boot the `ssh` spokes, run the program
through the lab engine, report what converged.

Used by the lab's command line (lab/__main__.py) and by the end-to-end tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from . import cvm, objectstore
from .cloud import Cloud
from .device import Device
from .engine import Result
from .hosts import Host, Lab
from .packages import DEFAULT_SUITE

HERE = Path(__file__).resolve().parent
STACK_FILE = HERE / "Pulumi.lab.yaml"
PROJECT = "dstack-vpn"
# The Debian release of the hosts standing in for `ssh` spokes, where not bookworm. The
# program cannot choose an existing host's OS; the lab runs one on Debian 13 so that
# every script, unit and ruleset runs on both releases that bracket Ubuntu 24.04 (the
# hub is on Debian 13 too, through its image slug; see Pulumi.lab.yaml). node-c: the
# spoke that logs in as a sudo user.
SSH_SPOKE_SUITES = {"node-c": "trixie"}


# The program's secret outputs: never written to the lab's outputs.json.
SECRET_OUTPUTS = ("dstackEnv", "postgresPasswords", "clients")
# Where the lab's devices (the stack's clients) sit on the underlay: .60 up, by their order.
DEVICE_FIRST_ADDRESS = 60
# The lab stack's spokes that are there for its PostgreSQL cluster alone (its third member).
POSTGRES_ONLY_SPOKES = ("node-e",)


def stack_settings(stack_file: Path = STACK_FILE, postgres: bool = True, monitor: bool = False,
                   clients: bool = False) -> dict[str, Any]:
    """The lab stack's settings; postgres=False: the network without its PostgreSQL cluster (no
    `postgres` setting, nor the spokes only the cluster needs), as the tests of the network itself
    and its benchmarks run it; monitor=True: with its monitor, clients=True: with its clients
    (people's devices) (the command line and tests/e2e/test_lab_monitor.py run both; the other
    tests and benchmarks do not)."""
    data = yaml.safe_load(Path(stack_file).read_text())["config"]
    settings = {k.split(":", 1)[1]: v for k, v in data.items() if k.startswith(PROJECT + ":")}
    if not clients:
        settings["spokes"] = [s for s in settings.get("spokes", []) if s.get("kind") != "client"]
    if not postgres:
        settings.pop("postgres", None)
        settings["spokes"] = [s for s in settings.get("spokes", []) if s["name"] not in POSTGRES_ONLY_SPOKES]
    if not monitor:
        settings.pop("monitor", None)
    return settings


class LabNetwork:
    def __init__(self, lab_dir: str | Path | None = None, name: str = "dvl", stack_file: Path = STACK_FILE,
                 log=print, postgres: bool = True, monitor: bool = False, clients: bool = False):
        self.lab = Lab(lab_dir, name)
        self.postgres = postgres
        """False: the network without its PostgreSQL cluster (stack_settings)"""
        self.monitor = monitor
        """True: with its monitor (stack_settings); the command line runs it, the tests where asked"""
        self.clients = clients
        """True: with its clients, each run by a device of the lab (lab/device.py) after `up`"""
        self.log = log
        self.stack_file = stack_file
        self.cloud = Cloud(self.lab, log=log)
        self.engine = self.cloud.engine(self.lab.state_dir / "pulumi-state.json", log=log)
        # the container engine that runs the dstack spokes' apps (not Pulumi's: self.engine)
        self.apps = cvm.Engine(self.lab)

    # -- what only the lab knows ----------------------------------------------
    def deploy_key(self) -> tuple[str, str]:
        """The key the program logs in to `ssh` spokes with: (private, public)."""
        path = self.lab.state_dir / "deploy_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dstack-vpn-lab-deploy",
                            "-f", str(path)], check=True)
        return path.read_text(), path.with_suffix(".pub").read_text().strip()

    def ssh_spoke_host(self, spoke: dict) -> Host:
        """The lab host standing in for an existing `ssh` spoke; booted when missing."""
        host = self.lab.hosts.get(spoke["name"])
        if host is None:
            user = spoke.get("user", "root")
            host = self.lab.host(spoke["name"], spoke["host"], authorized_keys=[self.deploy_key()[1]],
                                 ssh_user=None if user == "root" else user,
                                 suite=SSH_SPOKE_SUITES.get(spoke["name"], DEFAULT_SUITE))
        if not host.running:
            host.boot()
        return host

    def settings(self, **overrides: Any) -> dict[str, Any]:
        settings = {**stack_settings(self.stack_file, self.postgres, self.monitor, self.clients), **overrides}
        settings.setdefault("sshPrivateKey", self.deploy_key()[0])
        spokes = [dict(s) for s in settings.get("spokes", [])]
        lab_spokes = [s for s in spokes if s.get("kind") == "ssh" and s.get("host", "").startswith("198.51.100.")]
        with ThreadPoolExecutor(max_workers=8) as pool:
            hosts = list(pool.map(self.ssh_spoke_host, lab_spokes))
            list(pool.map(lambda h: h.wait_ssh(timeout=120), hosts))
        for spoke, host in zip(lab_spokes, hosts):
            spoke.setdefault("hostKey", host.host_key_public)
        for spoke in spokes:  # the spoke image the lab built, by digest, as a user names theirs
            if spoke.get("kind") == "dstack":
                spoke.setdefault("containerImage", self.apps.image())
        settings["spokes"] = spokes
        self._object_store(settings)
        return settings

    def _object_store(self, settings: dict) -> None:
        """Backups to the lab's S3 endpoint: it runs, the bucket exists, and the settings carry its
        CA certificate and an access key, as a user's would."""
        postgres = settings.get("postgres")
        repo = ((postgres or {}).get("backup") or {}).get("repository") or {}
        if repo.get("endpoint") != objectstore.ENDPOINT:
            return
        store = objectstore.ObjectStore(self.lab)
        store.start()
        store.create_bucket(repo["bucket"])
        backup = dict(postgres["backup"], repository=dict(repo))
        backup["repository"].setdefault("caCertificate", store.ca_certificate)
        settings["postgres"] = dict(postgres, backup=backup)
        key_id, secret = store.credentials()
        settings.setdefault("backupAccessKeyId", key_id)
        settings.setdefault("backupSecretAccessKey", secret)

    # -- the three commands -----------------------------------------------------
    def up(self, **overrides: Any) -> Result:
        self.lab.prepare()
        result = self.engine.up(self.settings(**overrides))
        self.save_outputs(result.outputs)
        self.run_dstack_apps(result.outputs)
        if self.clients:
            self.run_devices(result.outputs)
        return result

    def device(self, name: str, index: int = 0) -> Device:
        """The lab's device for client `name` (its namespace on the underlay at .60 + index)."""
        return Device(self.lab, name, f"198.51.100.{DEVICE_FIRST_ADDRESS + index}")

    def run_devices(self, outputs: dict) -> dict[str, Device]:
        """What a person does with a client's output (README: Clients): wg-quick up with its config,
        on a device of the lab's; a client that is gone takes its device with it."""
        configs = {name: out["config"] for name, out in outputs.get("clients", {}).items()}
        root = self.lab.state_dir / "devices"
        for path in sorted(root.iterdir()) if root.exists() else []:
            if path.name not in configs:
                Device(self.lab, path.name, "").close()
        devices = {}
        for index, (name, text) in enumerate(sorted(configs.items())):
            devices[name] = self.device(name, index)
            devices[name].up(text)
        return devices

    def run_dstack_apps(self, outputs: dict) -> None:
        """What a user does for each dstack spoke (README): run its app with its environment on
        a CVM; here a lab host of its own stands in for the CVM, and docker-compose with a
        container engine in its network namespace for dstack's (lab/cvm.py). A changed bundle
        replaces the running app; a spoke that is gone takes its CVM with it."""
        composes, envs = outputs.get("dstackCompose", {}), outputs.get("dstackEnv", {})
        record = self.lab.state_dir / "dstack-apps.json"
        running = json.loads(record.read_text()) if record.exists() else {}
        for name in sorted(set(running) - set(composes)):
            host = self.lab.hosts.get(name)
            if host is not None:
                self.apps.stop(host)
                host.destroy()
            running.pop(name)
        for name, compose in sorted(composes.items()):
            digest = hashlib.sha256((compose + envs[name]).encode()).hexdigest()
            host = self.lab.hosts.get(name) or self.lab.host(name)
            if not host.running:
                host.boot()
                host.wait_ssh(timeout=120)
            if running.get(name) != digest or not self.apps.running(host):
                self.apps.start(host, compose, envs[name])
                running[name] = digest
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(running, f)

    def down(self) -> None:
        try:
            for name in self.dstack_nodes():
                self.apps.stop(self.lab.hosts[name])
            if self.engine.state.records:
                self.engine.destroy()
        finally:
            self.lab.close()

    # -- what converged -----------------------------------------------------------
    def node_hosts(self) -> dict[str, Host]:
        """Node name -> its lab host, from the engine's state."""
        out: dict[str, Host] = {}
        for record in self.engine.state.records.values():
            if record.type == "digitalocean:index/droplet:Droplet":
                host = self.lab.hosts.get(record.outputs["labHost"])
                if host is not None:
                    out[record.inputs["name"]] = host
        for name, host in self.lab.hosts.items():  # the `ssh` spokes, named as their node
            if name not in out and not any(h is host for h in out.values()):
                out[name] = host
        return out

    def nodes(self) -> dict[str, dict]:
        """Node -> {address, public_key} as the program exported them on the last `up`."""
        return self.last_outputs().get("nodes", {})

    def last_outputs(self) -> dict:
        path = self.lab.state_dir / "outputs.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_outputs(self, outputs: dict) -> None:
        """The outputs the tables and tests read; the secret ones stay out."""
        path = self.lab.state_dir / "outputs.json"
        public = {k: v for k, v in outputs.items() if k not in SECRET_OUTPUTS}
        path.write_text(json.dumps(public, indent=1, sort_keys=True) + "\n")

    def dstack_nodes(self) -> list[str]:
        """The dstack spokes whose app runs on a lab host."""
        return [n for n in self.last_outputs().get("dstackCompose", {}) if n in self.lab.hosts]

    def handshakes(self) -> dict[str, float | None]:
        """Seconds since each node's latest handshake with the hub (None: never)."""
        hosts = self.node_hosts()
        nodes = self.nodes()
        out: dict[str, float | None] = {}
        hub = hosts.get("hub")
        if hub is None:
            return out
        dump = self.lab.ssh(hub, "wg show wg0 latest-handshakes", timeout=20).stdout
        by_key = {line.split()[0]: int(line.split()[1]) for line in dump.splitlines() if len(line.split()) == 2}
        now = time.time()
        for name, node in nodes.items():
            if name == "hub":
                continue
            stamp = by_key.get(node["public_key"], 0)
            out[name] = round(now - stamp, 1) if stamp else None
        return out

    def reachability(self) -> dict[tuple[str, str], bool]:
        """(from, to) -> one ping over the overlay answered, for every pair of spokes."""
        hosts, nodes = self.node_hosts(), self.nodes()
        spokes = [n for n in nodes if n != "hub" and n in hosts]
        pairs = [(a, b) for a in spokes for b in spokes if a != b]

        def ping(pair):
            a, b = pair
            proc = self.lab.ssh(hosts[a], f"ping -c1 -W2 {nodes[b]['address']}", timeout=20)
            return pair, proc.returncode == 0
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(ping, pairs))

    def wait_converged(self, timeout: float = 30) -> float:
        """Seconds until every spoke reaches every other (a spoke that came up before
        the hub retries its handshake after WireGuard's 5 s rekey timeout)."""
        t0 = time.monotonic()
        while not all(self.reachability().values()) and time.monotonic() - t0 < timeout:
            time.sleep(0.5)
        return time.monotonic() - t0

    def table(self) -> str:
        nodes, reach = self.nodes(), self.reachability()
        hs = self.handshakes()
        spokes = [n for n in nodes if n != "hub"]
        lines = [f"{'node':<10} {'overlay':<14} {'handshake':>10}   " + " ".join(f"{s:>7}" for s in spokes)]
        for name, node in nodes.items():
            age = "" if name == "hub" else ("never" if hs.get(name) is None else f"{hs[name]:.0f}s ago")
            cells = " ".join(f"{'-' if name == s or name == 'hub' else ('ok' if reach.get((name, s)) else 'FAIL'):>7}"
                             for s in spokes)
            lines.append(f"{name:<10} {node['address']:<14} {age:>10}   {cells}")
        lines.append("(reachability: one ping over the overlay from the row's node to the column's)")
        return "\n".join(lines)


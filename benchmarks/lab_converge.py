"""The lab, measured: image build, `up` to full reachability, a no-change `up`,
and the floor (the same hosts and tunnels brought up by hand with wg-quick).

Run as root: .venv/bin/python benchmarks/lab_converge.py [--cold]
--cold also builds the base image and package repository from nothing (about a minute).
Prints JSON; `ratio_to_floor` compares each `up` with the hand-made network of the same size.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.hosts import Lab  # noqa: E402
from lab.example import LabNetwork, stack_settings  # noqa: E402


def timed(fn):
    t0 = time.monotonic()
    value = fn()
    return time.monotonic() - t0, value


def spokes(n: int) -> list[dict]:
    """node-a as a droplet, the rest as `ssh` spokes on lab hosts (as the example stack)."""
    out = [{"name": "node-a", "kind": "droplet"}]
    for i in range(1, n):
        out.append({"name": f"node-{chr(ord('a') + i)}", "kind": "ssh", "host": f"198.51.100.{20 + i}",
                    "user": "root"})
    return out


def program_up(n: int) -> dict:
    net = LabNetwork(name="dvb", log=lambda *_: None, postgres=False)
    try:
        settings = {"spokes": spokes(n)}
        # the `ssh` spokes' hosts exist before `pulumi up`, as they would for real
        boot, _ = timed(lambda: net.settings(**settings))
        up, result = timed(lambda: net.up(**settings))
        converge = net.wait_converged(60)
        assert all(net.reachability().values()), "not converged"
        noop, again = timed(lambda: net.up(**settings))
        return {"spokes": n, "ssh_hosts_boot_s": round(boot, 2), "up_s": round(up, 2),
                "to_full_reachability_s": round(up + converge, 2), "resource_actions": len(result.actions),
                "noop_up_s": round(noop, 2), "noop_actions": len(again.actions)}
    finally:
        net.down()


def floor(n: int) -> dict:
    """The recipe's way: boot hosts, install wireguard-tools, write configs, wg-quick up."""
    with Lab(name="dvf") as lab:
        lab.prepare()
        t0 = time.monotonic()
        hosts = [lab.host("hub")] + [lab.host(f"s{i}") for i in range(n)]
        for h in hosts:
            h.boot()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda h: h.wait_ssh(60), hosts))
        keys = {}
        for h in hosts:
            private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
            public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True).stdout.strip()
            keys[h.name] = (private, public)
        hub = hosts[0]
        conf = {hub.name: f"[Interface]\nAddress = 10.88.0.1/24\nListenPort = 51820\nPrivateKey = {keys['hub'][0]}\n"}
        for i, h in enumerate(hosts[1:]):
            conf["hub"] += f"[Peer]\nPublicKey = {keys[h.name][1]}\nAllowedIPs = 10.88.0.{11 + i}/32\n"
            conf[h.name] = (f"[Interface]\nAddress = 10.88.0.{11 + i}/24\nPrivateKey = {keys[h.name][0]}\n"
                            f"[Peer]\nPublicKey = {keys['hub'][1]}\nEndpoint = {hub.address}:51820\n"
                            f"AllowedIPs = 10.88.0.0/24\nPersistentKeepalive = 25\n")
        script = ("set -e; export DEBIAN_FRONTEND=noninteractive; apt-get -q update >/dev/null; "
                  "apt-get -qy install --no-install-recommends wireguard-tools nftables wireguard-go >/dev/null; "
                  "sysctl -qw net.ipv4.ip_forward=1; umask 077; cat >/etc/wireguard/wg0.conf; "
                  "systemctl enable --now --quiet wg-quick@wg0")
        lab.ssh(hub, script, stdin=conf["hub"], check=True)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda h: lab.ssh(h, script, stdin=conf[h.name], check=True), hosts[1:]))
        targets = [f"10.88.0.{11 + i}" for i in range(n)]

        def reached(h):
            return all(lab.ssh(h, f"ping -c1 -W1 {t}").returncode == 0 for t in targets if t)
        while not all(reached(h) for h in hosts[1:]):
            time.sleep(0.2)
        return {"spokes": n, "to_full_reachability_s": round(time.monotonic() - t0, 2)}


def main() -> None:
    results: dict = {"benchmark": "lab convergence", "goal": "hub + 3 spokes converge in < 30 s, image cached"}
    if "--cold" in sys.argv:
        with tempfile.TemporaryDirectory(prefix="lab-cold-") as tmp:
            cold, _ = timed(lambda: Lab(tmp, name="dvc").prepare())
        results["image_build_cold_s"] = round(cold, 1)
    cached, _ = timed(lambda: Lab(name="dvb").prepare())
    results["image_build_cached_s"] = round(cached, 2)
    for n in (3, 12):
        up = program_up(n)
        ground = floor(n)
        up["floor_s"] = ground["to_full_reachability_s"]
        up["ratio_to_floor"] = round(up["to_full_reachability_s"] / ground["to_full_reachability_s"], 2)
        results[f"hub_plus_{n}"] = up
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    assert stack_settings()  # the lab stack file is readable
    main()

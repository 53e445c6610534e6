"""Day-two changes in the lab, measured: for adding a spoke, rotating a key, replacing the hub,
resizing it, losing it outside Pulumi, restarting the dstack spoke's app and rebooting a host, the time it took, the packets a 50 ms ping between two spokes lost
meanwhile, and the remote steps the change ran.

Run as root: .venv/bin/python benchmarks/lab_changes.py
Prints JSON, one object per change. `lost` is counted on a probe between two spokes the change
does not touch (node-a to node-b); `own_outage_s` is the changed node's own time away, where
there is one.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.example import LabNetwork, stack_settings  # noqa: E402
from lab.probe import Probe  # noqa: E402

NODE_E = {"name": "node-e", "kind": "ssh", "address": "10.88.0.15", "host": "198.51.100.24"}
REMOTE_STEP = "command:remote:Command"


class Recovery:
    """How long after the hub's WireGuard is back each spoke is: a timestamped ping (ping -D, the
    machine's clock) along a ring of spokes (a->b, b->c, ...: every spoke is in two pairs), and
    the hub's wg0 watched from this machine in its namespace. A pair is back at its first reply
    after the hub's wg0 came back; every spoke is back when the last pair is."""

    def __init__(self, net: LabNetwork, spokes: list[str]):
        self.net, self.pairs = net, list(zip(spokes, spokes[1:] + spokes[:1]))

    def __enter__(self):
        import subprocess
        import threading
        nodes, hosts = self.net.nodes(), self.net.node_hosts()
        self.procs, self.lines = [], {pair: [] for pair in self.pairs}
        for pair in self.pairs:
            argv = self.net.lab.ssh_argv(hosts[pair[0]], f"exec ping -D -n -i 0.05 -W 1 {nodes[pair[1]]['address']}")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=lambda p=proc, out=self.lines[pair]: out.extend(p.stdout), daemon=True).start()
            self.procs.append(proc)
        self.hub_netns = hosts["hub"].netns
        self.hub_back, self.hub_gone, self.stop = None, None, False

        def watch():
            while not self.stop:
                up = subprocess.run(["ip", "-n", self.hub_netns, "link", "show", "wg0"],
                                    capture_output=True).returncode == 0
                if not up and self.hub_gone is None:
                    self.hub_gone = time.time()
                if up and self.hub_gone is not None and self.hub_back is None:
                    self.hub_back = time.time()
                time.sleep(0.02)
        self.watcher = threading.Thread(target=watch, daemon=True)
        self.watcher.start()
        return self

    def __exit__(self, *exc):
        time.sleep(1)
        self.stop = True
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)
        self.watcher.join(5)
        return False

    def seconds(self) -> dict:
        """Per pair, seconds from the hub's wg0 back to the pair's first reply; None if unseen."""
        import re
        out = {}
        for (a, b), lines in self.lines.items():
            stamps = [float(m.group(1)) for m in map(re.compile(r"^\[(\d+\.\d+)\].*ttl=").search, lines) if m]
            after = [t for t in stamps if self.hub_back is not None and t >= self.hub_back]
            out[f"{a}->{b}"] = round(after[0] - self.hub_back, 2) if after else None
        return out


def remote_steps(result) -> int:
    return sum(1 for a in result.actions if a.type == REMOTE_STEP)


def measure(net: LabNetwork, change: str, act, own: str | None = None) -> dict:
    """Runs `act` with a probe between the untouched spokes (and one to `own`), then waits for
    full reachability."""
    with ExitStack() as probes:
        others = probes.enter_context(Probe(net, "node-a", "node-b"))
        own_probe = probes.enter_context(Probe(net, "node-a", own)) if own else None
        t0 = time.monotonic()
        result = act()
        converge = net.wait_converged(120)
        seconds = time.monotonic() - t0
    assert all(net.reachability().values()), f"{change}: not converged"
    row = {"change": change, "seconds_to_full_reachability": round(seconds, 2),
           "after_action_s": round(converge, 2), "probes_sent": others.sent, "lost": others.lost,
           "remote_steps": remote_steps(result) if result else 0}
    if own_probe:
        row["own_outage_s"] = own_probe.outage_seconds
    return row


def main() -> None:
    net = LabNetwork(name="dvm", log=lambda *_: None, postgres=False)
    base = [dict(s) for s in stack_settings(postgres=False)["spokes"]]
    for spoke in base:
        if spoke["kind"] == "droplet":
            spoke["size"] = "s-1vcpu-1gb"  # its own: resizing the hub leaves it (and the probe on it) alone
    rows = []
    try:
        net.lab.cleanup_stale()
        net.lab.prepare()
        net.settings(spokes=base + [NODE_E])  # boots every `ssh` spoke's host first, as for real
        net.save_outputs(net.up(spokes=base).outputs)
        net.wait_converged(60)

        last = {}

        def up(spokes, **more):
            result = net.up(spokes=spokes, **more)
            net.save_outputs(result.outputs)
            last.update(result.outputs)
            return result

        def restart_dstack_app():
            net.apps.stop(net.node_hosts()["node-d"])
            net.run_dstack_apps(last)

        rows.append(measure(net, "1 add a spoke", lambda: up(base + [NODE_E])))
        rotated = [dict(s) for s in base + [NODE_E]]
        rotated[2]["keyRotation"] = 1
        rows.append(measure(net, "3 rotate node-c's key", lambda: up(rotated), own="node-c"))
        rows.append(measure(net, "5 replace the hub", lambda: up(rotated, hubImage="ubuntu-22-04-x64")))
        # DigitalOcean's provider powers a droplet off to resize it: the hub is away for a boot
        rows.append(measure(net, "resize the hub (power cycle)",
                            lambda: up(rotated, hubImage="ubuntu-22-04-x64", hubSize="s-2vcpu-4gb")))

        def lose_the_hub():
            net.node_hosts()["hub"].destroy()  # deleted in the console; `up` refreshes first
            return up(rotated, hubImage="ubuntu-22-04-x64", hubSize="s-2vcpu-4gb")
        rows.append(measure(net, "hub deleted in the console, then up", lose_the_hub))
        rows.append(measure(net, "dstack app of node-d restarted", restart_dstack_app, own="node-d"))
        for node in ("node-c", "hub"):
            host = net.node_hosts()[node]
            with Recovery(net, ["node-a", "node-b", "node-c", "node-d"]) as recovery:
                rows.append(measure(net, f"6 reboot {node}", lambda: host.reboot(timeout=90) and None,
                                    own=None if node == "hub" else node))
            if node == "hub":  # the watchdog's goal: every spoke back within 5 s of the hub
                rows[-1]["spokes_back_after_hub_wg0_up_s"] = recovery.seconds()
    finally:
        net.down()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

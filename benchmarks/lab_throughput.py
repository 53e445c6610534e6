"""Spoke-to-spoke throughput and latency through the hub: the lab beside a bare floor.

The lab: the example network up for real on lab hosts (lab name "dvt"). The floor: the
netns recipe's bare hub-and-spoke (../shared/lab-notes/netns-recipe.sh): three plain network
namespaces of its own (dvtf-*) on a bridge, wireguard-go (this machine's) started by this
script and stopped by PID, the recipe's nftables rules, no systemd, no other service. Both are
measured the same way, alternately (floor, lab; lab, floor; ...), in the same minute: ping
(p50/p99 of --pings echo requests, 20 ms apart) and then iperf3 (TCP, one stream, --seconds
long) from one spoke to another through the hub.

iperf3 and ping run on this machine inside the spokes' network namespaces (`ip netns exec`):
the lab's host image has no iperf3 (the hosts get only what the program installs), and the
same binaries then measure both networks. They are not in the hosts' cgroups or under
systemd-nspawn's seccomp filter; the hosts' own load is what the hosts run besides the
measurement (systemd, the status service, the watchdog), as on a real spoke.

Run as root: .venv/bin/python benchmarks/lab_throughput.py [--rounds 5] [--seconds 5]
    [--pair node-a,node-b] [--max-busy 25] [--wait-quiet 60] [--reuse] [--keep]
--reuse measures a "dvt" lab left up by an earlier --keep (no `up`, no teardown of it).

Prints JSON: one row per measurement, then a summary of medians per network and `ratio` (the
lab's median Mbit/s over the floor's). Timings are printed, never asserted. The machine has
two cores and other labs and tests may run beside this one, so each row also says how busy
the machine was before it (load_1m, busy_pct_before; each run first waits up to --wait-quiet
s for under --max-busy %) and during it: other_cpu_s, the CPU time the machine spent beyond
the three wireguard-go processes and iperf3 (mostly someone else's work; over
QUIET_OTHER_SHARE of a CPU the run is disturbed). `ratio_quiet` compares the undisturbed runs
alone; `cpu_s_per_gbit` (wireguard-go and iperf3 CPU seconds per gigabit carried) compares the
two networks' cost per byte, which other load moves less than the rate.
Nothing is added to the machine's own network namespace.

Another network (say the TCP transport) is one more entry in `networks` in main(): any
object with node_hosts() (node -> something with .netns) and nodes() (node -> {"address"})
can be given to measure().
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.example import LabNetwork, stack_settings  # noqa: E402

LAB_NAME = "dvt"
IPERF_PORT = 5201
# A run counts as quiet when the rest of the machine (other labs, tests) took at most this share
# of one CPU-second per second of the run beyond what the measurement itself used.
QUIET_OTHER_SHARE = 0.1


def sh(argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([str(a) for a in argv], **kwargs)


def in_ns(ns: str, *argv) -> list[str]:
    return ["ip", "netns", "exec", ns, *map(str, argv)]


def ns_pids(ns: str) -> list[int]:
    out = sh(["ip", "netns", "pids", ns]).stdout
    return [int(p) for p in out.split()]


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of pids (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _wireguard_pids(ns: str) -> list[int]:
    out = []
    for pid in ns_pids(ns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go":
                out.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]  # nearest rank


def ping(ns: str, address: str, count: int, interval: float = 0.02) -> dict:
    out = sh(in_ns(ns, "ping", "-n", "-c", count, "-i", interval, "-W", 1, address),
             timeout=count * interval + 30).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    return {"ping_p50_ms": _percentile(rtts, 50), "ping_p99_ms": _percentile(rtts, 99),
            "ping_lost": count - len(rtts)}


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat (user, nice, system,
    irq, softirq; steal apart)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(values[:7]) - values[3] - values[4]) / hz, values[7] / hz


def iperf3(src_ns: str, dst_ns: str, address: str, seconds: float, watch: dict[str, str]) -> dict:
    """One TCP stream src -> dst for `seconds`. Besides the rate: CPU seconds of the wireguard-go
    processes in each namespace of `watch` (role -> namespace) while it ran, and `other_cpu_s`:
    what the whole machine was busy with meanwhile beyond those and the two iperf3 processes
    (the kernel's softirq work for this traffic, and everything else running on the machine:
    other labs, tests; a high figure marks a disturbed run), `steal_s` the hypervisor's share."""
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = subprocess.Popen(in_ns(dst_ns, "iperf3", "-s", "-1", "-B", address, "-p", IPERF_PORT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while f":{IPERF_PORT}" not in sh(in_ns(dst_ns, "ss", "-Hltn", f"sport = :{IPERF_PORT}")).stdout:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"iperf3 server in {dst_ns} did not listen")
            time.sleep(0.05)
        wg = {role: _wireguard_pids(ns) for role, ns in watch.items()}
        cpu0 = {role: _cpu_seconds(pids) for role, pids in wg.items()}
        machine0 = _machine_cpu()
        client = sh(in_ns(src_ns, "iperf3", "-c", address, "-p", IPERF_PORT, "-t", seconds, "-J"),
                    timeout=seconds + 30)
        machine1 = _machine_cpu()
        cpu = {f"wg_cpu_s_{role}": round(_cpu_seconds(pids) - cpu0[role], 2) for role, pids in wg.items()}
        server.wait(10)
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        data = json.loads(client.stdout or "{}")
        if "error" in data or "end" not in data:
            raise RuntimeError(f"iperf3: {data.get('error') or client.stderr.strip()}")
        end = data["end"]
        iperf_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        other = machine1[0] - machine0[0] - sum(cpu.values()) - iperf_cpu
        mbit_s = end["sum_received"]["bits_per_second"] / 1e6
        gbit = end["sum_received"]["bytes"] * 8 / 1e9
        return {"mbit_s": round(mbit_s, 1), "retransmits": end["sum_sent"].get("retransmits"), **cpu,
                "iperf3_cpu_s": round(iperf_cpu, 2), "other_cpu_s": round(other, 2),
                "steal_s": round(machine1[1] - machine0[1], 2),
                # what a gigabit costs the WireGuard processes and iperf3 together (the kernel's
                # work is in their system time): less sensitive to other load than mbit_s
                "cpu_s_per_gbit": round((sum(cpu.values()) + iperf_cpu) / gbit, 2) if gbit else None}
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure(net, a: str, b: str, seconds: float = 5, pings: int = 200) -> dict:
    """The figures of one spoke pair a -> b through the hub, on a network `net`: a LabNetwork, a
    Floor, or anything with the same node_hosts() and nodes()."""
    hosts, nodes = net.node_hosts(), net.nodes()
    src, dst, address = hosts[a].netns, hosts[b].netns, nodes[b]["address"]
    watch = {"a": src, "hub": hosts["hub"].netns, "b": dst}
    latency = ping(src, address, pings)  # idle first: no iperf3 queue in the way
    return {**iperf3(src, dst, address, seconds, watch), **latency}


class Floor:
    """The netns recipe's bare hub-and-spoke: namespaces <prefix>-wan (a bridge), <prefix>-hub,
    <prefix>-a, <prefix>-b; wireguard-go (the machine's, or `hub_wireguard_go` on the hub) run by
    this object and stopped by PID; the recipe's nftables rules. Underlay 198.51.100.0/24 and
    overlay 10.88.0.0/24 exist only inside these namespaces. A context manager: everything goes
    on exit, on success and on failure."""

    U, O = "198.51.100", "10.88.0"
    NODES = {"hub": 1, "node-a": 11, "node-b": 12}

    def __init__(self, prefix: str = "dvtf", wireguard_go: str = "wireguard-go",
                 hub_wireguard_go: str | None = None):
        self.prefix = prefix
        self.wan = f"{prefix}-wan"
        self.ns = {"hub": f"{prefix}-hub", "node-a": f"{prefix}-a", "node-b": f"{prefix}-b"}
        # wireguard-go's control socket is /run/wireguard/<if>.sock, shared by plain namespaces
        self.ifname = {n: ns[:15] for n, ns in self.ns.items()}
        self.binary = {n: wireguard_go for n in self.NODES}
        if hub_wireguard_go:
            self.binary["hub"] = hub_wireguard_go
        self.procs: list[subprocess.Popen] = []

    # the interface measure() uses, as LabNetwork's
    def node_hosts(self) -> dict:
        return {n: SimpleNamespace(netns=ns) for n, ns in self.ns.items()}

    def nodes(self) -> dict:
        return {n: {"address": f"{self.O}.{h}"} for n, h in self.NODES.items()}

    def _run(self, argv, **kwargs):
        result = sh(argv, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))}: {result.stderr.strip()}")
        return result

    def __enter__(self) -> Floor:
        self.close()  # what a crashed earlier run left (only our own names)
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _up(self) -> None:
        keys = {}
        for n in self.NODES:
            private = self._run(["wg", "genkey"]).stdout.strip()
            keys[n] = (private, self._run(["wg", "pubkey"], input=private).stdout.strip())
        for ns in [self.wan, *self.ns.values()]:
            self._run(["ip", "netns", "add", ns])
            self._run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self._run(["ip", "-n", self.wan, "link", "add", "br0", "type", "bridge"])
        self._run(["ip", "-n", self.wan, "link", "set", "br0", "up"])
        for n, ns in self.ns.items():  # both veth ends born inside the namespaces
            port = f"p-{n}"[:15]
            self._run(["ip", "-n", ns, "link", "add", "veth0", "type", "veth", "peer", "name", port,
                       "netns", self.wan])
            self._run(["ip", "-n", self.wan, "link", "set", port, "master", "br0", "up"])
            self._run(["ip", "-n", ns, "addr", "add", f"{self.U}.{self.NODES[n]}/24", "dev", "veth0"])
            self._run(["ip", "-n", ns, "link", "set", "veth0", "up"])
        self._run(in_ns(self.ns["hub"], "sysctl", "-qw", "net.ipv4.ip_forward=1",
                        "net.ipv4.conf.all.send_redirects=0"))
        confs = {"hub": f"[Interface]\nListenPort = 51820\nPrivateKey = {keys['hub'][0]}\n"}
        for n in ("node-a", "node-b"):
            confs["hub"] += f"\n[Peer]\nPublicKey = {keys[n][1]}\nAllowedIPs = {self.O}.{self.NODES[n]}/32\n"
            confs[n] = (f"[Interface]\nPrivateKey = {keys[n][0]}\n\n[Peer]\nPublicKey = {keys['hub'][1]}\n"
                        f"Endpoint = {self.U}.1:51820\nAllowedIPs = {self.O}.0/24\nPersistentKeepalive = 25\n")
        for n in self.NODES:  # what wg-quick does with wireguard-go, step by step
            ns, ifname = self.ns[n], self.ifname[n]
            proc = subprocess.Popen(in_ns(ns, self.binary[n], "-f", ifname), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            deadline = time.monotonic() + 10
            while not Path(f"/run/wireguard/{ifname}.sock").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"wireguard-go {ifname} did not start")
                time.sleep(0.02)
            self._run(in_ns(ns, "wg", "setconf", ifname, "/dev/stdin"), input=confs[n])
            self._run(["ip", "-n", ns, "addr", "add", f"{self.O}.{self.NODES[n]}/24", "dev", ifname])
            self._run(["ip", "-n", ns, "link", "set", ifname, "mtu", "1420", "up"])
        self._run(in_ns(self.ns["hub"], "nft", "-f", "-"), input=self._hub_nft())
        for n in ("node-a", "node-b"):
            self._run(in_ns(self.ns[n], "nft", "-f", "-"), input=self._spoke_nft(n))
        for n in ("node-a", "node-b"):
            for _ in range(100):
                if sh(in_ns(self.ns[n], "ping", "-c1", "-W1", f"{self.O}.1")).returncode == 0:
                    break
            else:
                raise RuntimeError(f"floor: {n} does not reach the hub")

    def _hub_nft(self) -> str:  # the recipe's, with our interface name
        wg = self.ifname["hub"]
        return f"""table inet floor_hub {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{wg}" oifname "{wg}" ip saddr {self.O}.0/24 ip daddr {self.O}.0/24 accept
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    ip daddr {self.O}.0/24 ct state established,related accept
    ip daddr {self.O}.0/24 counter drop comment "hub never originates overlay traffic"
  }}
}}
"""

    def _spoke_nft(self, n: str) -> str:
        wg = self.ifname[n]
        return f"""table inet floor_spoke {{
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iif "lo" accept
    iifname "veth0" ip saddr {self.U}.1 udp sport 51820 accept comment "WireGuard from hub (underlay)"
    ip saddr {self.O}.1 ct state new counter drop comment "hub may not open connections"
    iifname "{wg}" ip saddr {self.O}.0/24 accept
  }}
}}
"""

    def close(self) -> None:
        """Stop every process in our namespaces by PID (ours first), delete the namespaces."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for ns in [*self.ns.values(), self.wan]:
            if not Path(f"/run/netns/{ns}").exists():
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in ns_pids(ns):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                for _ in range(50):
                    if not ns_pids(ns):
                        break
                    time.sleep(0.1)
            sh(["ip", "netns", "del", ns])
        for ifname in self.ifname.values():
            Path(f"/run/wireguard/{ifname}.sock").unlink(missing_ok=True)


def busy_percent(seconds: float = 1.0) -> float:
    """How busy the machine's CPUs were over `seconds` (all of it: other labs and tests too)."""
    def sample():
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(values), values[3] + values[4]  # idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return round(100 * (1 - (idle1 - idle0) / max(1, total1 - total0)), 1)


def wait_quiet(max_busy: float, wait: float) -> tuple[float, float]:
    """Wait up to `wait` s for the machine to be under max_busy % busy; (busy %, seconds waited)."""
    t0 = time.monotonic()
    busy = busy_percent()
    while busy > max_busy and time.monotonic() - t0 < wait:
        busy = busy_percent()
    return busy, round(time.monotonic() - t0, 1)


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--pair", default="node-a,node-b", help="the spokes: from,to")
    parser.add_argument("--max-busy", type=float, default=25,
                        help="before each run wait for the machine's CPUs to be under this %% busy...")
    parser.add_argument("--wait-quiet", type=float, default=60, help="...for at most this many seconds")
    parser.add_argument("--tcp-rounds", type=int, default=3,
                        help="then this many runs with the sending spoke on transport tcp (0: none)")
    parser.add_argument("--reuse", action="store_true", help=f"measure a running '{LAB_NAME}' lab, leave it up")
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, lab hosts)")
    a, b = args.pair.split(",")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through the finally blocks: nothing left behind
        signal.signal(sig, _interrupted)
    if not args.reuse:  # what an earlier run left; its engine state goes with it, so a new object after
        LabNetwork(name=LAB_NAME, log=lambda *_: None, postgres=False).lab.cleanup_stale()
    net = LabNetwork(name=LAB_NAME, log=lambda *_: None, postgres=False)
    rows: list[dict] = []
    started = time.time()
    try:
        if not args.reuse:
            net.lab.prepare()
            net.up()
        net.wait_converged(60)
        if not all(net.reachability().values()):
            raise RuntimeError("the lab has not converged")
        with Floor() as floor:
            networks = [("floor", floor), ("lab", net)]  # a further network: one more entry
            for r in range(args.rounds):
                for name, target in networks if r % 2 == 0 else networks[::-1]:
                    busy, waited = wait_quiet(args.max_busy, args.wait_quiet)
                    row = {"round": r + 1, "network": name, "load_1m": round(os.getloadavg()[0], 2),
                           "busy_pct_before": busy, "waited_s": waited,
                           **measure(target, a, b, args.seconds, args.pings)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        if args.tcp_rounds:  # the same pair with the sender on the TCP transport (spokes[].transport)
            spokes = [dict(s, transport="tcp") if s["name"] == a else dict(s) for s in stack_settings(postgres=False)["spokes"]]
            net.up(spokes=spokes)
            net.wait_converged(60)
            for r in range(args.tcp_rounds):
                busy, waited = wait_quiet(args.max_busy, args.wait_quiet)
                row = {"round": r + 1, "network": "lab-tcp", "load_1m": round(os.getloadavg()[0], 2),
                       "busy_pct_before": busy, "waited_s": waited, **measure(net, a, b, args.seconds, args.pings)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if not (args.keep or args.reuse):
            net.down()
    summary: dict = {"benchmark": "spoke-to-spoke throughput through the hub", "pair": f"{a}->{b}",
                     "seconds_per_run": args.seconds, "wall_s": round(time.time() - started, 1)}
    quiet_other = QUIET_OTHER_SHARE * args.seconds
    for name in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == name]
        summary[name] = {k: median(mine, k) for k in
                         ("mbit_s", "retransmits", "ping_p50_ms", "ping_p99_ms", "cpu_s_per_gbit",
                          "load_1m", "busy_pct_before", "wg_cpu_s_a", "wg_cpu_s_hub", "wg_cpu_s_b",
                          "iperf3_cpu_s", "other_cpu_s", "steal_s")}
        quiet = [r for r in mine if r["other_cpu_s"] <= quiet_other]
        summary[name]["quiet_runs"] = len(quiet)
        summary[name]["mbit_s_quiet"] = median(quiet, "mbit_s")
    floor, lab = summary.get("floor", {}), summary.get("lab", {})
    if floor.get("mbit_s") and lab.get("mbit_s"):
        summary["ratio"] = round(lab["mbit_s"] / floor["mbit_s"], 2)
    if floor.get("mbit_s_quiet") and lab.get("mbit_s_quiet"):
        summary["ratio_quiet"] = round(lab["mbit_s_quiet"] / floor["mbit_s_quiet"], 2)
    if summary.get("lab-tcp", {}).get("mbit_s") and lab.get("mbit_s"):
        summary["tcp_over_udp"] = round(summary["lab-tcp"]["mbit_s"] / lab["mbit_s"], 2)
    if floor.get("cpu_s_per_gbit") and lab.get("cpu_s_per_gbit"):
        summary["cpu_per_gbit_ratio"] = round(lab["cpu_s_per_gbit"] / floor["cpu_s_per_gbit"], 2)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

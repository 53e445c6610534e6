"""A background probe between two spokes: ping every 50 ms over the overlay, count what is lost."""
from __future__ import annotations

import re
import subprocess
import threading
import time

PROBE_INTERVAL = 0.05


class Probe:
    """ping every 50 ms from one spoke to another over the overlay; counts what was lost."""

    def __init__(self, net, src: str, dst: str):
        self.net, self.src, self.dst = net, src, dst

    def __enter__(self):
        address = self.net.nodes()[self.dst]["address"]
        argv = self.net.lab.ssh_argv(self.net.node_hosts()[self.src], f"exec ping -n -O -i {PROBE_INTERVAL} -W 1 {address}")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        time.sleep(1)
        return self

    def __exit__(self, *exc):
        time.sleep(1.5)  # the last packets' answers
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(5)
        replies = {int(m.group(1)) for m in map(re.compile(r"icmp_seq=(\d+) ttl").search, self.lines) if m}
        seen = {int(m.group(1)) for m in map(re.compile(r"icmp_seq=(\d+)").search, self.lines) if m}
        last = max(seen, default=0) - int(1 / PROBE_INTERVAL)  # still in flight at the end
        self.sent = len([s for s in seen if s <= last])
        self.lost = len([s for s in seen if s <= last and s not in replies])
        return False

    @property
    def outage_seconds(self) -> float:
        return round(self.lost * PROBE_INTERVAL, 2)

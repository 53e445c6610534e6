"""Port probes run inside a lab namespace (never the machine's own).

`probe(host_or_ns, target, tcp=[...], udp=[...])` answers per port:
  tcp: "open" (SYN-ACK), "closed" (RST), "filtered" (no answer)
  udp: "closed" (ICMP port unreachable), "silent" (no answer: open or filtered)
"""
from __future__ import annotations

import json
import subprocess

PROBER = r'''
import json, socket, sys, threading
target, tcp, udp, timeout = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
out = {"tcp": {}, "udp": {}}
def tcp_probe(port):
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((target, port)); out["tcp"][port] = "open"
    except ConnectionRefusedError:
        out["tcp"][port] = "closed"
    except OSError:
        out["tcp"][port] = "filtered"
    finally:
        s.close()
def udp_probe(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
    try:
        s.connect((target, port)); s.send(b"probe"); s.recv(100); out["udp"][port] = "answered"
    except ConnectionRefusedError:
        out["udp"][port] = "closed"
    except OSError:
        out["udp"][port] = "silent"
    finally:
        s.close()
threads = [threading.Thread(target=tcp_probe, args=(p,)) for p in tcp]
threads += [threading.Thread(target=udp_probe, args=(p,)) for p in udp]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(out))
'''


def probe(netns: str, target: str, tcp=(), udp=(), timeout: float = 1.5) -> dict:
    proc = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", PROBER, target,
                           json.dumps(list(tcp)), json.dumps(list(udp)), str(timeout)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    raw = json.loads(proc.stdout)
    return {"tcp": {int(k): v for k, v in raw["tcp"].items()}, "udp": {int(k): v for k, v in raw["udp"].items()}}

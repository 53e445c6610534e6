"""How many remote steps a change runs: adding one spoke to a network of N spokes.

Runs the real program through the lab engine with recording providers (no
hosts needed) and prints JSON. Goal: the count does not grow with N (the new
spoke's own steps plus the hub's peer step).
Usage: .venv/bin/python benchmarks/change_steps.py [N...]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

from components.keys import ssh_key_pair  # noqa: E402
from lab.engine import Engine  # noqa: E402
from test_lab_engine import Recorder, commands  # noqa: E402


def network(n: int) -> list[dict]:
    return [{"name": f"node-{i}", "kind": "ssh", "host": f"192.0.2.{i % 250 + 1}", "allowUnknownHostKey": True}
            for i in range(n)]


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [3, 10, 50, 100]
    deploy_key = ssh_key_pair("bench")[0]
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rec = Recorder()
            engine = Engine(Path(tmp) / "state.json", {"": rec}, log=lambda _: None)
            base = {"adminCidrs": ["203.0.113.10/32"], "sshPrivateKey": deploy_key, "overlayCidr": "10.88.0.0/22"}
            engine.up({**base, "spokes": network(n)})
            rec.calls.clear()
            t0 = time.perf_counter()
            engine.up({**base, "spokes": network(n + 1)})
            steps = commands(rec.calls)
            results.append({"spokes_before": n, "remote_steps_run": len(steps), "steps": steps,
                            "engine_s": round(time.perf_counter() - t0, 2)})
    print(json.dumps({"benchmark": "remote steps for adding one spoke", "results": results}, indent=2))


if __name__ == "__main__":
    main()

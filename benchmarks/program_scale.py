"""How the program scales: run it under Pulumi's mocks with 3, 50 and 250 spokes.

Each size runs in a fresh process; prints JSON with wall time, peak memory
(max RSS of that process) and how many resources were registered.
Goal: 250 spokes in under 10 s on a 2-core machine, growing linearly.
Usage: .venv/bin/python benchmarks/program_scale.py [sizes...]
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def one(spokes: int) -> dict:
    import program
    from components.keys import ssh_key_pair

    host_key = ssh_key_pair("bench")[1]
    spoke_list = [
        {"name": f"node-{i}", "kind": "droplet"} if i % 5 == 0 else
        {"name": f"node-{i}", "kind": "ssh", "host": f"192.0.2.{i % 250 + 1}", "hostKey": host_key}
        for i in range(spokes)
    ]
    settings = program.stack_config(sshPrivateKey=ssh_key_pair("deploy")[0],
                                    overlayCidr="10.88.0.0/22", spokes=spoke_list)
    start = time.perf_counter()
    run = program.run(settings)
    wall = time.perf_counter() - start
    return {"spokes": spokes, "wall_s": round(wall, 2), "resources": len(run.registrations),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(int(sys.argv[2]))))
        return
    sizes = [int(a) for a in sys.argv[1:]] or [3, 50, 250]
    results = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        r["s_per_spoke"] = round(r["wall_s"] / r["spokes"], 4)
    print(json.dumps({"benchmark": "program under mocks", "goal": "250 spokes < 10 s, linear",
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""The lab's command line: bring the example network up on this machine, show it, take it down.

    python3 -m lab up       # boot hosts, run the program for real, print the table
    python3 -m lab status   # the table again: overlay addresses, handshakes, reachability
    python3 -m lab down     # pulumi destroy, then remove every lab host and namespace
Run as root. The lab lives in $DSTACK_VPN_LAB_DIR (default /var/lib/dstack-vpn-lab).
"""
from __future__ import annotations

import argparse
import sys
import time

from .engine import EngineError
from .example import LabNetwork


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lab", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "status", "down"])
    args = parser.parse_args(argv)
    net = LabNetwork(monitor=True, clients=True)
    if args.command == "up":
        t0 = time.monotonic()
        try:
            result = net.up()
        except EngineError as err:
            print(f"lab up failed: {err}", file=sys.stderr)
            return 1
        print(f"`up` done in {time.monotonic() - t0:.1f}s, {len(result.actions)} resource actions")
        print(f"every spoke reaches every other after {net.wait_converged():.1f}s more")
        print(net.table())
    elif args.command == "status":
        if not net.engine.state.records:
            print("the lab network is not up (python3 -m lab up)")
            return 1
        print(net.table())
    else:
        net.down()
        print("lab torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One lab network per end-to-end test module."""
from __future__ import annotations

import contextlib
import time

from conftest import need_root


@contextlib.contextmanager
def lab_network(name: str, postgres: bool = False, monitor: bool = False, clients: bool = False):
    """A lab network called `name`, prepared: what a crashed run of that name left is removed
    first, and every host and namespace goes at the end, on failure too. Without the lab stack's
    PostgreSQL cluster, its monitor and its clients unless asked (lab.example.stack_settings)."""
    need_root("the lab")
    from lab.example import LabNetwork
    from lab.hosts import Lab

    Lab(name=name).cleanup_stale()  # before the network reads its (stale) engine state
    network = LabNetwork(name=name, log=lambda *_: None, postgres=postgres, monitor=monitor, clients=clients)
    try:
        network.lab.prepare()
        yield network
    finally:
        network.down()


def wait_until(check, timeout: float = 30.0, step: float = 0.3):
    """check() until it gives something true or timeout seconds pass; its last answer."""
    end = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > end:
            return result
        time.sleep(step)

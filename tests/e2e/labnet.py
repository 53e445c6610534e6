"""One lab network per end-to-end test module."""
from __future__ import annotations

import contextlib

from conftest import need_root


@contextlib.contextmanager
def lab_network(name: str):
    """A lab network called `name`, prepared: what a crashed run of that name left is removed
    first, and every host and namespace goes at the end, on failure too."""
    need_root("the lab")
    from lab.network import LabNetwork

    network = LabNetwork(name=name, log=lambda *_: None)
    try:
        network.lab.cleanup_stale()
        network.lab.prepare()
        yield network
    finally:
        network.down()

"""The Pulumi Python SDK's private parts that the lab and the tests lean on, in one place.

Pulumi's public API has no way to run a program in-process against a monitor of our own and
wait for it, nor to read its wire format; these do it. They were read from the SDK release that
requirements.txt pins (PINNED): check() refuses another, so an SDK upgrade is a deliberate step
that reads this module again (tests/unit/test_sdk.py runs check() and touches every name).
"""
from __future__ import annotations

from importlib.metadata import version
from typing import Any, Awaitable

from pulumi.runtime import rpc, settings, sync_await

PINNED = "3.272.0"
# The wire form of a secret value: {SIG_KEY: SECRET_SIG, "value": ...} (pulumi/sdk/python/lib/pulumi/runtime/rpc.py).
SIG_KEY: str = rpc._special_sig_key
SECRET_SIG: str = rpc._special_secret_sig


def check() -> None:
    found = version("pulumi")
    if found != PINNED:
        raise RuntimeError(f"lab/sdk.py was read from the Pulumi SDK {PINNED}, this is {found}: read the SDK's "
                           "rpc.py, settings.py and sync_await.py again, then set PINNED")


def wait(awaitable: Awaitable) -> Any:
    """Run an awaitable to its end on the runtime's loop (what the SDK does in its own sync paths)."""
    return sync_await._sync_await(awaitable)


def ensure_event_loop() -> None:
    """The mock monitor's handlers run off the runtime's thread: give this one a loop."""
    from pulumi.runtime import mocks
    mocks._ensure_event_loop()


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SIG_KEY) == SECRET_SIG


def pending() -> list:
    """Every registration and output the runtime still waits for; the lists are emptied."""
    manager = settings._get_rpc_manager()
    out = list(manager.rpcs) + list(settings.SETTINGS.outputs)
    manager.rpcs.clear()
    settings.SETTINGS.outputs.clear()
    return out


def serialize_provider(provider: Any) -> str:
    """A dynamic provider as the SDK stores it in a resource's inputs (__provider)."""
    from pulumi.dynamic.dynamic import serialize_provider as serialize
    return serialize(provider)


check()

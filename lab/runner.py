"""Run the unchanged Pulumi program (__main__.py) in this process, against a
resource monitor of ours: Pulumi's mocks for tests, the lab engine for the lab.
"""
from __future__ import annotations

import asyncio
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pulumi
from pulumi.runtime import settings as psettings
from pulumi.runtime import stack as pstack

from . import sdk

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "dstack-vpn"
SECRET_KEYS = ("sshPrivateKey", "nodeSecrets", "phalaApiKey", "backupAccessKeyId", "backupSecretAccessKey",
               "monitorSecrets")


def run_program(monitor, mocks: pulumi.runtime.Mocks, config: dict[str, Any], stack: str,
                preview: bool = False, secret_keys: tuple[str, ...] = SECRET_KEYS,
                program: Path = ROOT / "__main__.py", continue_on_error: bool = False,
                secret_outputs: set[str] | None = None) -> dict[str, Any]:
    """Run `program` with `config` (this project's keys) and return its exports.

    secret_outputs: filled with the names of the exports that are secret.

    continue_on_error: as `pulumi up --continue-on-error`, every registration
    that does not depend on a failed one still runs before the error is raised."""
    # A fresh runtime and event loop: nothing left over from an earlier (failed) run.
    psettings.reset_options(project=PROJECT, stack=stack, preview=preview)
    old_loop = asyncio.get_event_loop_policy().get_event_loop() if _has_loop() else None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=preview, monitor=monitor)
    pulumi.runtime.set_all_config(
        {f"{PROJECT}:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in config.items()},
        [f"{PROJECT}:{k}" for k in secret_keys if k in config])
    sys.path.insert(0, str(program.parent))
    try:
        try:
            sdk.wait(pstack.run_pulumi_func(lambda: runpy.run_path(str(program), run_name="__main__")))
        except Exception:
            if continue_on_error:
                sdk.wait(_drain())
            raise
        root = psettings.get_root_resource()
        exports = getattr(root, "outputs", None) or {}
        if secret_outputs is not None:
            secret_outputs.update(k for k, v in exports.items()
                                  if sdk.wait(pulumi.Output.from_input(v).is_secret()))
        return {key: sdk.wait(pulumi.Output.from_input(value).future(with_unknowns=True))
                for key, value in exports.items()}
    finally:
        sys.path.remove(str(program.parent))
        loop.close()
        if old_loop is not None and not old_loop.is_closed():
            asyncio.set_event_loop(old_loop)


async def _drain() -> None:
    """Let every outstanding registration settle, failed or not."""
    while pending := sdk.pending():
        await asyncio.gather(*pending, return_exceptions=True)


def _has_loop() -> bool:
    try:
        asyncio.get_event_loop_policy().get_event_loop()
        return True
    except RuntimeError:
        return False

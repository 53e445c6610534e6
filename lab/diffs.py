"""How the real providers decide between update and replace, per resource type.

Pure functions: the lab's providers use them, and so do the engine's tests.
Field names are the wire (camelCase) names the engine sees.
"""
from __future__ import annotations

import base64
from typing import Any

import dill

# Fields whose change makes DigitalOcean's provider replace the resource (ForceNew).
REPLACE_ON = {
    "digitalocean:index/droplet:Droplet": {"image", "region", "userData", "sshKeys", "ipv6"},
    "digitalocean:index/reservedIp:ReservedIp": {"region"},
    "digitalocean:index/reservedIpAssignment:ReservedIpAssignment": {"ipAddress", "dropletId"},
    "digitalocean:index/sshKey:SshKey": {"publicKey"},
    "digitalocean:index/tag:Tag": {"name"},
    "digitalocean:index/firewall:Firewall": set(),
}
DYNAMIC = "pulumi-python:dynamic:Resource"
COMMAND = "command:remote:Command"
LOCAL_COMMAND = "command:local:Command"
PROVIDER_KEY = "__provider"


def changed(old: dict, new: dict) -> set[str]:
    return {k for k in set(old) | set(new) if old.get(k) != new.get(k)}


def diff(typ: str, old_inputs: dict, old_outputs: dict, new_inputs: dict) -> str:
    """'none', 'update' or 'replace', as the real provider of `typ` would answer."""
    fields = changed(old_inputs, new_inputs)
    if not fields:
        return "none"
    if typ in (COMMAND, LOCAL_COMMAND):
        # pulumi-command: a change of triggers replaces; anything else runs `update`.
        return "replace" if "triggers" in fields else "update"
    if typ == DYNAMIC:
        return dynamic_diff(old_outputs, new_inputs)
    if typ in REPLACE_ON:
        return "replace" if fields & REPLACE_ON[typ] else "update"
    raise ValueError(f"no diff rule for {typ}")


def dynamic_diff(old_outputs: dict, new_inputs: dict) -> str:
    """Ask the program's own dynamic provider, as Pulumi's dynamic provider host does."""
    provider = load_provider(new_inputs)
    olds = {k: v for k, v in old_outputs.items() if k != PROVIDER_KEY}
    news = {k: v for k, v in new_inputs.items() if k != PROVIDER_KEY}
    if not hasattr(type(provider), "diff"):
        return "update" if changed(olds, news) else "none"
    result = provider.diff("", olds, news)
    if result.replaces:
        return "replace"
    return "update" if result.changes else "none"


def load_provider(inputs: dict) -> Any:
    return dill.loads(base64.b64decode(inputs[PROVIDER_KEY]))

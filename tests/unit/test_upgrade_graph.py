"""Upgrades: a stack deployed with yesterday's code sees today's change only where it means to.

The resource graph of the example stack (Pulumi.dev.yaml, with a dstack spoke deployed on Phala
Cloud as well) is recorded in fixtures/resource-graph.json: each resource's URN, type and inputs
(short plain values as they are, long or secret ones as a SHA-256: keys are seeded, so the record
is the same in every run). Any difference fails this test with what a deployed stack would see
(create, delete, update or replace, and the fields), as the real providers decide (lab/diffs.py).
When the change is on purpose, record it again and say why in the commit message:

    DSTACK_VPN_RECORD_GRAPH=1 .venv/bin/python -m pytest -q tests/unit/test_upgrade_graph.py
"""
import hashlib
import json
import os
from pathlib import Path

import program
from lab import diffs

RECORD = Path(__file__).parent / "fixtures" / "resource-graph.json"
SHORT = 120  # characters of JSON kept as they are


def example_settings() -> dict:
    deploy = program.seeded_key("record/deploy", {"kind": "ssh-ed25519"})["private_key"]
    spokes = program.stack_config()["spokes"] + [
        {"name": "node-d", "kind": "dstack", "address": "10.88.0.14", "phala": {"instanceType": "tdx.small"},
         "containerImage": program.SPOKE_IMAGE}]
    return program.stack_config(sshPrivateKey=deploy, spokes=spokes, phalaApiKey="phak_record_only")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _recorded(value):
    """An input as the record keeps it."""
    if program.is_secret_marker(value):
        return {"secret-sha256": _digest(program.unwrap(value))}
    text = json.dumps(value, sort_keys=True)
    if len(text) <= SHORT and not any(program.is_secret_marker(v) for v in _nested(value)):
        return value
    return {"sha256": _digest(program.unwrap(value))}


def _nested(value):
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _nested(v)
    elif isinstance(value, list):
        for v in value:
            yield from _nested(v)


def graph() -> dict:
    run = program.run(example_settings(), seed="record")
    return {r.urn: {"type": r.type, "inputs": {k: _recorded(v) for k, v in sorted(r.inputs.items())}}
            for r in sorted(run.registrations, key=lambda r: r.urn) if not r.type.startswith("dstack-vpn:index:")}


def what_a_deployed_stack_sees(old: dict, new: dict) -> list[str]:
    out = []
    for urn in sorted(set(old) | set(new)):
        name = urn.split("::")[-1]
        if urn not in new:
            out.append(f"delete  {name} ({old[urn]['type']})")
        elif urn not in old:
            out.append(f"create  {name} ({new[urn]['type']})")
        elif old[urn] != new[urn]:
            was, now = old[urn]["inputs"], new[urn]["inputs"]
            fields = sorted(diffs.changed(was, now))
            typ = new[urn]["type"]
            op = diffs.diff(typ, was, was, now) if typ != diffs.DYNAMIC else \
                ("replace" if {"kind", "comment", "rotation"} & set(fields) else "update")
            out.append(f"{op:<7} {name}: {', '.join(fields)}")
    return out


def test_the_recorded_resource_graph_is_what_the_program_declares():
    current = graph()
    if os.environ.get("DSTACK_VPN_RECORD_GRAPH") == "1":
        RECORD.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"\n*** recorded the resource graph again: {RECORD} ***")
    recorded = json.loads(RECORD.read_text())
    changes = what_a_deployed_stack_sees(recorded, current)
    assert not changes, (
        "a stack deployed with the recorded graph would see:\n  " + "\n  ".join(changes) +
        "\nIf on purpose: DSTACK_VPN_RECORD_GRAPH=1 .venv/bin/python -m pytest -q tests/unit/test_upgrade_graph.py, "
        "and say why in the commit (STYLE.md, Upgrades); a moved URN needs an alias")


def test_the_record_holds_no_secret_value():
    text = RECORD.read_text()
    run = program.run(example_settings(), seed="record")
    assert run.made_secrets and not [s[:8] for s in run.made_secrets if s in text]
    assert "phak_record_only" not in text and "PRIVATE KEY" not in text


def test_a_change_is_reported_as_a_deployed_stack_would_see_it():
    recorded = json.loads(RECORD.read_text())
    changed = json.loads(json.dumps(recorded))
    hub = next(u for u in changed if u.endswith("::hub") and changed[u]["type"].endswith("droplet:Droplet"))
    changed[hub]["inputs"]["size"] = "s-2vcpu-4gb"
    step = next(u for u in changed if u.endswith("::node-b-install"))
    changed[step]["inputs"]["create"] = {"sha256": "0"}
    key = next(u for u in changed if u.endswith("::node-b-wg-key"))
    changed[key]["inputs"]["rotation"] = 1
    assert sorted(what_a_deployed_stack_sees(recorded, changed)) == [
        "replace node-b-wg-key: rotation", "update  hub: size", "update  node-b-install: create"]
    app = next(u for u in changed if u.endswith("::node-d-phala-app"))
    changed[app]["inputs"]["triggers"] = ["another-cvm-name"]
    assert "replace node-d-phala-app: triggers" in what_a_deployed_stack_sees(recorded, changed)
    changed[hub]["inputs"]["image"] = "ubuntu-22-04-x64"
    assert "replace hub: image, size" in what_a_deployed_stack_sees(recorded, changed)

"""The program under Pulumi's mocks: the resource graph, the peer list, and every secret kept secret."""
import json
import re

import pulumi
import pytest

import program
from components import keys

SSH_KEY = keys.ssh_key_pair("deploy")[0]
CMD = "command:remote:Command"
DROPLET = "digitalocean:index/droplet:Droplet"


def settings(**overrides):
    """The dev stack without its PostgreSQL cluster (tests/unit/test_postgres.py has it), its
    monitor (tests/unit/test_monitor.py) and its clients (tests/unit/test_client.py)."""
    return program.stack_config(sshPrivateKey=SSH_KEY, **{"postgres": None, "monitor": None,
                                                          "spokes": program.host_spokes(), **overrides})


@pytest.fixture(scope="module")
def example():
    return program.run(settings())


def parent_name(run, reg):
    (parent,) = [r for r in run.registrations if r.urn == reg.parent] or [None]
    return parent.name if parent else None


def test_resource_graph_of_the_example_stack(example):
    count = lambda t: len(example.of_type(t))  # noqa: E731
    assert count("dstack-vpn:index:Network") == 1
    assert count("dstack-vpn:index:Hub") == 1
    assert count("dstack-vpn:index:Spoke") == 3
    assert count(DROPLET) == 2  # the hub and node-a
    assert count("digitalocean:index/firewall:Firewall") == 2
    assert count("digitalocean:index/reservedIp:ReservedIp") == 1
    assert count("digitalocean:index/reservedIpAssignment:ReservedIpAssignment") == 1
    assert count("digitalocean:index/sshKey:SshKey") == 1
    assert count(CMD) == 5 + 3 * 5  # install, firewall, (forwarding,) wireguard, (status,) transport
    assert count(program.DYNAMIC) == 4 + 3 + 2  # wg keys, preshared keys, droplet host keys
    assert sorted(r.name for r in example.of_type(CMD) if r.name.startswith("hub-")) == [
        "hub-firewall", "hub-forwarding", "hub-install", "hub-transport", "hub-wireguard"]


def test_parentage(example):
    for reg in example.registrations:
        if reg.type == "dstack-vpn:index:Network":
            continue
        parent = parent_name(example, reg)
        assert parent is not None, reg.name
        if reg.type == CMD or reg.type == DROPLET:
            assert reg.name.startswith(parent), (reg.name, parent)
    assert parent_name(example, example.named("hub-ip")) == "hub"
    assert parent_name(example, example.named("node-b-wireguard")) == "node-b"


def test_steps_run_in_order_and_undo_before_replace(example):
    # forwarding after the firewall: the hub never routes without its ruleset
    chains = {"hub": ["install", "firewall", "forwarding", "wireguard", "transport"],
              "node-a": ["install", "firewall", "transport", "wireguard", "status"],
              "node-b": ["install", "firewall", "transport", "wireguard", "status"]}
    for host, chain in chains.items():
        for before, after in zip(chain, chain[1:]):
            assert example.named(f"{host}-{before}").urn in example.named(f"{host}-{after}").dependencies
        cmds = {r.name: r for r in example.of_type(CMD) if r.name.startswith(host + "-")}
        assert sorted(cmds) == sorted(f"{host}-{step}" for step in chain)
        for reg in cmds.values():
            assert reg.delete_before_replace
            inputs = program.unwrap(reg.inputs)
            assert inputs["create"] == inputs["update"]
            assert inputs["addPreviousOutputInEnv"] is False
            # undo on a host that stays; a droplet's steps go with it (a lost one cannot answer)
            assert bool(inputs.get("delete")) == (host == "node-b"), (reg.name, inputs.get("delete"))


def test_droplet_steps_are_replaced_with_their_droplet(example):
    for name in ("hub-install", "node-a-wireguard"):
        assert program.unwrap(example.named(name).inputs)["triggers"]
    assert "triggers" not in program.unwrap(example.named("node-b-install").inputs)


def wg_conf(run, node):
    return program.unwrap(run.named(f"{node}-wireguard").inputs)["stdin"]


def test_hub_peer_list_is_derived_from_the_spokes(example):
    nodes = example.outputs["nodes"]
    conf = wg_conf(example, "hub")
    peers = re.findall(r"PublicKey = (\S+)\n(?:PresharedKey = \S+\n)?AllowedIPs = (\S+)", conf)
    assert peers == [(nodes[n]["public_key"], nodes[n]["address"] + "/32") for n in ("node-a", "node-b", "node-c")]
    assert conf.count("PresharedKey") == 3
    for node in ("node-a", "node-b", "node-c"):
        spoke = wg_conf(example, node)
        assert f"PublicKey = {nodes['hub']['public_key']}" in spoke
        assert f"Endpoint = {example.outputs['hubPublicIp']}:51820" in spoke
        assert f"Address = {nodes[node]['address']}/24" in spoke


def test_preshared_keys_match_on_both_ends(example):
    hub = dict(re.findall(r"PresharedKey = (\S+)\nAllowedIPs = (\S+)/32", wg_conf(example, "hub")))
    for node in ("node-a", "node-b", "node-c"):
        (psk,) = re.findall(r"PresharedKey = (\S+)", wg_conf(example, node))
        assert hub[psk] == example.outputs["nodes"][node]["address"]


def test_connections(example):
    hub = program.unwrap(example.named("hub-install").inputs)["connection"]
    droplet = program.unwrap(example.named("hub").inputs)
    assert hub["host"].startswith("198.51.100.") and hub["user"] == "root"
    assert hub["hostKey"].startswith("ssh-ed25519 ") and len(hub["hostKey"].split()) == 2
    # the host key the steps check is the one cloud-init installs
    assert hub["hostKey"] in droplet["userData"]
    assert hub["dialErrorLimit"] >= 30
    node_c = program.unwrap(example.named("node-c-install").inputs)["connection"]
    assert node_c["host"] == "198.51.100.22" and node_c["user"] == "deploy"
    assert node_c["hostKey"].startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBE3")
    assert program.unwrap(example.named("node-c-install").inputs)["create"].startswith("sudo -n ")


def test_cloud_firewall_matches_the_spec(example):
    rules = program.unwrap(example.named("hub-cloud-firewall").inputs)
    inbound = {(r["protocol"], r["portRange"]): r["sourceAddresses"] for r in rules["inboundRules"]}
    assert inbound == {("tcp", "22"): ["203.0.113.10/32"], ("udp", "51820"): ["0.0.0.0/0", "::/0"]}
    assert {r["protocol"] for r in rules["outboundRules"]} == {"tcp", "udp", "icmp"}


def test_secrets_are_secret(example):
    secret_inputs = {
        "hub-wireguard": ["stdin"], "node-b-wireguard": ["stdin"], "hub": ["userData"], "node-a": ["userData"]}
    for name, fields in secret_inputs.items():
        for f in fields:
            assert program.is_secret_marker(example.named(name).inputs[f]), (name, f)
    for reg in example.of_type(CMD):
        conn = reg.inputs["connection"]
        assert program.is_secret_marker(conn) or program.is_secret_marker(conn["privateKey"]), reg.name
        if reg.name.endswith("-wireguard"):
            assert set(reg.additional_secret_outputs) >= {"stdout", "stderr"}
            assert program.unwrap(reg.inputs)["logging"] == "none"
    for reg in example.of_type(program.DYNAMIC):
        assert "private_key" in reg.additional_secret_outputs


def secret_texts(run):
    texts = set(run.made_secrets) | {SSH_KEY}
    # also each line of PEM bodies, in case one was reflowed into a file
    for t in list(texts):
        texts |= {line for line in t.splitlines() if len(line) >= 24 and "PRIVATE KEY" not in line}
    return texts


def test_no_secret_in_any_plain_input_or_output(example):
    secrets = secret_texts(example)
    assert len(example.made_secrets) == 9
    found = []
    for reg in example.registrations:
        for text in program.plain_strings(reg.inputs):
            found += [(reg.name, s[:6]) for s in secrets if s in text]
    for text in program.plain_strings(json.loads(json.dumps(example.outputs))):
        found += [("outputs", s[:6]) for s in secrets if s in text]
    assert found == []
    # the scan can see: a secret does turn up once the markers are taken off
    assert any(s in json.dumps(program.unwrap(example.named("hub-wireguard").inputs)) for s in secrets)


def test_no_command_text_carries_a_secret_marked_or_not():
    """A command's text reaches `bash -c` on the host (and sudo's journal line, and an error's
    message) whether Pulumi marks it secret or not: secrets go on stdin or in the environment."""
    spokes = program.host_spokes() + [
        {"name": "node-d", "kind": "dstack", "phala": {"instanceType": "tdx.small"}, "containerImage": program.SPOKE_IMAGE}]
    run = program.run(settings(spokes=spokes, phalaApiKey="phak_never_in_a_command"))
    secrets = secret_texts(run) | {"phak_never_in_a_command"}
    commands = run.of_type(CMD) + run.of_type("command:local:Command")
    assert len(commands) == 21
    found = [(reg.name, field, s[:6]) for reg in commands for field in ("create", "update", "delete")
             for s in secrets if s in json.dumps(program.unwrap(reg.inputs.get(field)))]
    assert found == []
    # none of them is even marked secret: a marked command text hides nothing from the host
    assert not [(r.name, f) for r in commands for f in ("create", "update", "delete")
                if program.is_secret_marker(r.inputs.get(f))]


def test_outputs_are_plain_public_values(example):
    out = example.outputs
    assert set(out) == {"hubPublicIp", "nodes", "deployPublicKey"}
    assert set(out["nodes"]) == {"hub", "node-a", "node-b", "node-c"}
    assert out["nodes"]["node-b"]["address"] == "10.88.0.12"
    assert out["deployPublicKey"].startswith("ssh-ed25519 ")


def test_pinned_key_is_used_and_no_key_resource_made():
    pinned = keys.wireguard_private_key()
    run = program.run(settings(nodeSecrets={"node-b": {"wireguardPrivateKey": pinned}}))
    assert run.outputs["nodes"]["node-b"]["public_key"] == keys.wireguard_public_key(pinned)
    assert "node-b-wg-key" not in [r.name for r in run.registrations]
    assert program.is_secret_marker(run.named("node-b-wireguard").inputs["stdin"])
    assert not any(pinned in t for r in run.registrations for t in program.plain_strings(r.inputs))


def test_deploy_key_made_when_not_configured():
    run = program.run(program.stack_config(spokes=[{"name": "node-a", "kind": "droplet"}], postgres=None, monitor=None))
    key = run.named("dstack-vpn-deploy-key", program.DYNAMIC)
    do_key = program.unwrap(run.named("dstack-vpn-deploy-key", "digitalocean:index/sshKey:SshKey").inputs)
    assert run.outputs["deployPublicKey"] == do_key["publicKey"]
    assert "private_key" in key.additional_secret_outputs


def test_bad_config_registers_nothing():
    spokes = [{"name": "a", "kind": "droplet"}, {"name": "a", "kind": "droplet"}]
    with pytest.raises(Exception, match=r"spokes\[1\]\.name.*used twice"):
        program.run(settings(spokes=spokes))
    assert pulumi.runtime.settings.get_monitor().registrations == []


def test_preview_with_unknown_values_does_not_fail():
    run = program.run(settings(), preview=True)
    assert len(run.of_type(CMD)) == 20
    # unknown outputs stay unknown, nothing is invented
    assert run.outputs["hubPublicIp"] is pulumi.output.UNKNOWN
    assert all(node["public_key"] is pulumi.output.UNKNOWN for name, node in run.outputs["nodes"].items())
    # no provider function (a data source would need the cloud), no key made, secrets still secret
    assert run.calls == [] and run.made_secrets == []
    for name in ("hub", "node-a"):
        assert program.is_secret_marker(run.named(name).inputs["userData"])
    assert [r.name for r in run.registrations] and \
        sorted(r.urn for r in run.registrations) == sorted(r.urn for r in program.run(settings()).registrations)


def inputs_by_urn(run):
    return {r.urn: json.dumps(r.inputs, sort_keys=True) for r in run.registrations}


def test_two_runs_record_identical_inputs():
    first, second = (inputs_by_urn(program.run(settings(), seed="same")) for _ in range(2))
    assert first == second


def test_adding_a_spoke_changes_only_its_resources_and_the_hub_peer_step():
    before = inputs_by_urn(program.run(settings(), seed="add"))
    spokes = program.host_spokes() + [{"name": "node-d", "kind": "droplet"}]
    after = inputs_by_urn(program.run(settings(spokes=spokes), seed="add"))
    changed = sorted(u.split("::")[-1] for u in before if before[u] != after.get(u))
    assert changed == ["hub-wireguard"]
    added = sorted(u.split("::")[-1] for u in after if u not in before)
    assert all(name.startswith("node-d") for name in added) and "node-d-wireguard" in added


def test_rotating_one_key_touches_that_spoke_and_the_hub_only():
    before = inputs_by_urn(program.run(settings(), seed="rot"))
    spokes = program.host_spokes()
    spokes[1]["keyRotation"] = 1
    after = inputs_by_urn(program.run(settings(spokes=spokes), seed="rot"))
    changed = sorted(u.split("::")[-1] for u in before if before[u] != after.get(u))
    assert changed == ["hub-wireguard", "node-b-psk", "node-b-wg-key", "node-b-wireguard"]


def test_droplets_carry_the_stack_tag(example):
    (tag,) = example.of_type("digitalocean:index/tag:Tag")
    assert program.unwrap(tag.inputs)["name"] == "dstack-vpn-test"
    for droplet in example.of_type(DROPLET):
        assert program.unwrap(droplet.inputs)["tags"] == ["dstack-vpn-test"]


def test_a_spoke_tunnel_comes_up_after_the_hub_knows_the_spoke(example):
    hub_peer_step = example.named("hub-wireguard").urn
    for node in ("node-a", "node-b", "node-c"):
        assert hub_peer_step in example.named(f"{node}-wireguard").dependencies
        assert hub_peer_step not in example.named(f"{node}-install").dependencies


def test_an_unchecked_host_key_warns_that_keys_go_over_that_connection(monkeypatch):
    warnings = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **k: warnings.append(msg))
    spokes = program.host_spokes()
    del spokes[1]["hostKey"]
    spokes[1]["allowUnknownHostKey"] = True
    program.run(settings(spokes=spokes))
    (warning,) = [w for w in warnings if "node-b" in w]
    assert "WireGuard private and preshared keys, which are sent over that unchecked connection" in warning
    assert "ssh-keyscan -t ed25519" in warning

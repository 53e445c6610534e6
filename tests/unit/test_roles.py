"""The node/role seam: what a role declares reaches every place built from it (the install step,
the host ruleset, the cloud firewall, the spoke image, the config's keys), and steps run in the
order their `after` names give. A made-up role stands in for the next one."""
import json

import pytest

from components import config, render, topology
from components.nodes import dstack
from components.nodes.remote import hub_node, install_step, openings, spoke_node
from components.roles import Node, Role, all_roles, firewall, hub_roles, spoke_roles
from components.steps import Step, ordered
from components.keys import ssh_key_pair
from test_render import example_config, nft_check


class Extra(Role):
    """A made-up role: a TCP service on the hub, open to everyone."""
    name = "extra"
    config_keys = frozenset({"extraPort"})
    packages = ("socat",)

    def openings(self, node):
        return [topology.Opening("tcp", 8443, topology.PUBLIC)] if node.is_hub else []

    def steps(self, node):
        return [Step("extra", {}, after=("wireguard",))]


def test_every_stack_setting_is_the_networks_or_a_roles():
    assert config.top_level_keys() == config.NETWORK_KEYS | {
        "listenPort", "interface", "mtu", "adminCidrs", "statusPort", "statusCidrs", "tcpPort", "postgres",
        "backupAccessKeyId", "backupSecretAccessKey", "monitor", "monitorSecrets"}
    owners = {}
    for role in all_roles():
        for key in role.config_keys:
            owners.setdefault(key, set()).add(role.name)
    assert not set(owners) & config.NETWORK_KEYS


def test_the_install_step_installs_what_the_roles_declare():
    hub = hub_node(example_config())
    assert install_step(hub, hub_roles()).values == {"packages": ["wireguard-tools", "nftables"],
                                                     "userspace": ["wireguard-go"]}
    values = install_step(hub, hub_roles() + [Extra()]).values
    assert values["packages"] == ["wireguard-tools", "nftables", "socat"]
    script = render.script("install", "scripts/install.sh", **values)
    assert "for pkg in wireguard-tools nftables socat; do" in script


def test_the_spoke_image_holds_what_a_dstack_spokes_roles_declare():
    assert dstack.image_packages() == ["wireguard-tools", "iputils-ping", "nftables", "v2ray", "wireguard-go",
                                       "python3", "iproute2"]
    from image import build
    assert list(build.PACKAGES) == dstack.image_packages()


def test_a_roles_opening_reaches_the_host_ruleset_and_the_cloud_firewall(tmp_path):
    cfg = example_config()
    node = Node(cfg, "hub", cfg.hub.address, "droplet", None, metadata_service=True)
    node.openings = openings(node, hub_roles() + [Extra()], ssh_port=22)
    assert node.openings == [topology.Opening("tcp", 22, topology.ADMIN),
                             topology.Opening("udp", cfg.listen_port, topology.PUBLIC),
                             topology.Opening("tcp", 8443, topology.PUBLIC)]
    text = render.render("nftables/hub.nft", **firewall.values(node))
    nft_check(tmp_path, text)
    assert "\t\tudp dport 51820 accept\n\t\ttcp dport 8443 accept\n" in text
    assert topology.cloud_firewall_inbound(cfg, node.openings)[-1] == dict(
        protocol="tcp", port_range="8443", source_addresses=["0.0.0.0/0", "::/0"])
    # without the role, neither has it
    plain = hub_node(cfg)
    assert "dport 8443" not in render.render("nftables/hub.nft", **firewall.values(plain))
    assert [r["port_range"] for r in topology.cloud_firewall_inbound(cfg, plain.openings)] == ["22", "51820"]


def test_a_spoke_without_the_status_role_opens_no_status_port(tmp_path):
    cfg = example_config()
    spoke = cfg.spokes[0]
    node = Node(cfg, spoke.name, spoke.address, spoke.kind, spoke, metadata_service=True)
    node.openings = openings(node, [r for r in spoke_roles() if r.name != "status"], ssh_port=22)
    text = render.render("nftables/spoke.nft", **firewall.values(node))
    nft_check(tmp_path, text)
    assert "status_v4" not in text and "dport 8000" not in text
    assert "status_v4" in render.render("nftables/spoke.nft", **firewall.values(spoke_node(cfg, spoke)))


def test_steps_follow_what_they_name_and_a_new_roles_step_slots_in():
    cfg = example_config()
    node = spoke_node(cfg, cfg.spokes[1])
    steps = [install_step(node, spoke_roles())] + [s for r in spoke_roles() + [Extra()] for s in r.steps(node)]
    assert [s.name for s in ordered(steps)] == ["install", "firewall", "transport", "wireguard", "status", "extra"]
    hub = hub_node(cfg)
    steps = [install_step(hub, hub_roles())] + [s for r in hub_roles() for s in r.steps(hub)]
    assert [s.name for s in ordered(steps)] == ["install", "firewall", "forwarding", "wireguard", "transport"]
    # the spoke's tunnel waits for the hub's peers: a step of another node, by name
    (wg,) = [s for r in spoke_roles() for s in r.steps(node) if s.name == "wireguard"]
    assert "hub/wireguard" in wg.after


def test_steps_that_wait_for_each_other_or_share_a_name_are_refused():
    with pytest.raises(ValueError, match="wait for each other"):
        ordered([Step("a", {}, after=("b",)), Step("b", {}, after=("a",))])
    with pytest.raises(ValueError, match="share a name"):
        ordered([Step("a", {}), Step("a", {})])


def test_a_role_knows_no_node_kind():
    """Roles read the topology and their node; reaching a node is the kinds' business."""
    import ast
    from pathlib import Path
    for path in sorted(Path(firewall.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not [m for m in imported if "nodes" in m or "pulumi_command" in m or "digitalocean" in m], \
            (path.name, imported)


def test_the_roles_cli_lists_the_host_packages(capsys):
    import runpy
    runpy.run_module("components.roles", run_name="__main__")
    assert json.loads(capsys.readouterr().out) == {"hosts": [
        "wireguard-tools", "nftables", "v2ray", "iputils-ping", "postgresql", "postgresql-client", "patroni",
        "etcd-server", "etcd-client", "pgbackrest", "prometheus", "prometheus-alertmanager",
        "prometheus-postgres-exporter", "wireguard-go"]}


SSH_KEY = ssh_key_pair("roles")[0]


def test_a_setting_of_another_kind_is_refused_naming_both_kinds():
    raw = {"adminCidrs": json.dumps(["203.0.113.10/32"]), "sshPrivateKey": SSH_KEY,
           "spokes": json.dumps([{"name": "node-a", "kind": "droplet", "hostKey": "x"}])}
    with pytest.raises(config.ConfigError, match=r"spokes\[0\].hostKey: not for kind 'droplet'; only for kind 'ssh' "
                                                 r"\(a droplet's connection is made by the program\)"):
        config.parse(raw)

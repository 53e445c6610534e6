"""Every file that lands on a host, rendered and checked by the real tool that reads it."""
import json
import re
import dataclasses
import subprocess

import pytest

from components import config, keys, render, topology
from components.nodes.remote import hub_node, install_step, spoke_node
from components.roles import firewall, forwarding, spoke_roles, wireguard
from components.roles import status as status_role
from conftest import need_root, need_tool

SSH_KEY = keys.ssh_key_pair("t")[0]
HOST_KEY = keys.ssh_key_pair("h")[1]


def example_config():
    raw = {"adminCidrs": ["203.0.113.10/32", "2001:db8::/48"], "sshPrivateKey": SSH_KEY,
           "spokes": [{"name": "node-a", "kind": "droplet"},
                      {"name": "node-b", "kind": "ssh", "host": "198.51.100.21", "port": 2222, "hostKey": HOST_KEY,
                       "presharedKey": False}]}
    return config.parse({k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()})


@pytest.fixture(scope="module")
def cfg():
    return example_config()


def hub_conf(cfg):
    peers = [{"name": s.name, "address": s.address, "public_key": keys.wireguard_public_key(keys.wireguard_private_key()),
              "preshared_key": keys.preshared_key() if s.preshared_key else None} for s in reversed(cfg.spokes)]
    return wireguard.hub_conf(hub_node(cfg), keys.wireguard_private_key(), peers)


def spoke_conf(cfg, psk=True):
    return wireguard.spoke_conf(spoke_node(cfg, cfg.spokes[0]), keys.wireguard_private_key(),
                                keys.preshared_key() if psk else None,
                                keys.wireguard_public_key(keys.wireguard_private_key()), "203.0.113.5")


def wg_quick_strip(tmp_path, text):
    need_root("wg-quick strip")
    need_tool("wg-quick")
    path = tmp_path / "wg0.conf"
    path.write_text(text)
    path.chmod(0o600)
    out = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_hub_config_parses_and_lists_peers_in_address_order(cfg, tmp_path):
    text = hub_conf(cfg)
    stripped = wg_quick_strip(tmp_path, text)
    assert "ListenPort = 51820" in stripped and "Address" not in stripped  # wg-quick's own keys stripped
    assert re.findall(r"AllowedIPs = (\S+)", text) == ["10.88.0.11/32", "10.88.0.12/32"]
    assert text.count("PresharedKey") == 1  # node-b opted out


def test_spoke_config_parses(cfg, tmp_path):
    for psk in (True, False):
        text = spoke_conf(cfg, psk)
        stripped = wg_quick_strip(tmp_path, text)
        assert "Endpoint = 203.0.113.5:51820" in stripped
        assert "AllowedIPs = 10.88.0.0/24" in stripped and "PersistentKeepalive = 25" in stripped
        assert ("PresharedKey" in stripped) == psk


def nft_check(tmp_path, text):
    need_tool("nft")
    need_tool("unshare")
    path = tmp_path / "rules.nft"
    path.write_text(text)
    # a throwaway user+network namespace: the real kernel check, nothing of the machine touched
    out = subprocess.run(["unshare", "-rn", "nft", "-c", "-f", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + text


def test_hub_ruleset_loads(cfg, tmp_path):
    text = render.render("nftables/hub.nft", **firewall.values(hub_node(cfg)))
    nft_check(tmp_path, text)
    assert "flush ruleset" not in text
    assert 'iifname "wg0" oifname "wg0" accept' in text
    assert "203.0.113.10/32" in text and "2001:db8::/48" in text
    assert "udp dport 51820 accept" in text


def test_spoke_ruleset_loads(cfg, tmp_path):
    text = render.render("nftables/spoke.nft", **firewall.values(spoke_node(cfg, cfg.spokes[1])))
    nft_check(tmp_path, text)
    assert "flush ruleset" not in text
    assert "tcp dport 2222 accept" in text and "tcp dport 8000 accept" in text
    # the hub's own address is dropped before the overlay is accepted
    assert text.index("ip saddr 10.88.0.1 drop") < text.index("ip saddr 10.88.0.0/24 accept")


def test_ruleset_with_only_ipv6_admins_loads(cfg, tmp_path):
    values = firewall.values(hub_node(cfg))
    values.update(admin_v4=[], admin_v6=["2001:db8::/48"])
    nft_check(tmp_path, render.render("nftables/hub.nft", **values))


# Every step's values, from the functions the roles use themselves (node-a: a droplet spoke).
_CFG = example_config()
_HUB_KEY = "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMTI="
_SPOKE = spoke_node(_CFG, _CFG.spokes[0], hub_public_key=_HUB_KEY)
SCRIPT_VALUES = {
    "install": install_step(_SPOKE, spoke_roles()).values,
    "forwarding": forwarding.values(),
    "firewall": firewall.step_values(),
    "wireguard": wireguard.interface_values(_SPOKE),
    "wireguard-hub": wireguard.interface_values(hub_node(_CFG)),
    "status": status_role.values(_SPOKE),
}


@pytest.mark.parametrize("step", sorted(SCRIPT_VALUES))
@pytest.mark.parametrize("undo", [False, True])
@pytest.mark.parametrize("user", ["root", "deploy"])
def test_step_scripts_pass_shellcheck(step, undo, user, tmp_path):
    shellcheck = need_tool("shellcheck")
    values = SCRIPT_VALUES[step]
    step = step.split("-")[0]  # (a variant of a step: the same scripts, other values)
    name = f"scripts/{step}{'-undo' if undo else ''}.sh"
    script = render.script(step, name, **values)
    path = tmp_path / "step.sh"
    path.write_text(script)
    out = subprocess.run([shellcheck, "-s", "bash", "-S", "warning", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    # the command string the login shell runs: valid sh, runs bash as root with the script intact
    command = render.command(step, name, user, **values)
    assert subprocess.run(["sh", "-n", "-c", command]).returncode == 0
    assert command.startswith("sudo -n /bin/bash -c " if user != "root" else "/bin/bash -c ")
    printed = subprocess.run(["sh", "-c", command.replace("/bin/bash -c", "printf '%s\\0'", 1).replace("sudo -n ", "")],
                             capture_output=True, text=True).stdout
    assert printed.split("\0")[:2] == [script, f"dstack-vpn-{step}"]


def test_nudge_unit_verifies_and_only_spokes_get_it(tmp_path):
    need_tool("systemd-analyze")
    unit = tmp_path / "dstack-vpn-nudge.service"
    unit.write_text(render.render("systemd/dstack-vpn-nudge.service", **SCRIPT_VALUES["wireguard"]))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"ExecStart=/bin/bash {wireguard.WATCHDOG} wg0 10.88.0.1\n" in unit.read_text()
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\n" in unit.read_text()
    spoke = render.script("wireguard", "scripts/wireguard.sh", **SCRIPT_VALUES["wireguard"])
    hub = render.script("wireguard", "scripts/wireguard.sh", **SCRIPT_VALUES["wireguard-hub"])
    assert "dstack-vpn-nudge.service" in spoke and "dstack-vpn-nudge" not in hub
    assert f"install_stdin 0755 {wireguard.WATCHDOG} <<'WATCHDOG'" in spoke and "watchdog" not in hub


def test_the_watchdog_passes_shellcheck_and_keeps_the_config_off_argv_and_disk(tmp_path):
    shellcheck = need_tool("shellcheck")
    text = render.render("wireguard/watchdog.sh", **wireguard.watchdog_values())
    path = tmp_path / "watchdog.sh"
    path.write_text(text)
    out = subprocess.run([shellcheck, "-s", "bash", "-S", "warning", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    # the configuration (with the private key) goes through a pipe from showconf to syncconf
    assert 'conf=$(wg showconf "$IF"' in text and 'wg syncconf "$IF" <(printf \'%s\\n\' "$conf")' in text
    assert "> " not in text.replace(">/dev/null", "")  # no file written


def test_the_hub_answers_its_spokes_echo_requests_over_the_overlay_only(cfg, tmp_path):
    text = render.render("nftables/hub.nft", **firewall.values(hub_node(cfg)))
    nft_check(tmp_path, text)
    rules = [line.strip() for line in text.splitlines() if "icmp type echo-request" in line]
    assert rules == ['iifname "wg0" ip saddr 10.88.0.0/24 icmp type echo-request accept']
    # its answer is a reply: new connections out of wg0 are still dropped
    assert 'oifname "wg0" ct state established,related accept\n\t\toifname "wg0" drop' in text


def test_firewall_unit_verifies(tmp_path):
    need_tool("systemd-analyze")
    need_tool("nft")
    unit = tmp_path / "dstack-vpn-firewall.service"
    unit.write_text(render.render("systemd/dstack-vpn-firewall.service", rules_path=firewall.RULES_PATH))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_firewall_unit_with_the_forwarding_drop_in_verifies(tmp_path):
    """systemd-analyze verify the unit with the hub's drop-in beside it (the way systemd merges it)."""
    need_tool("systemd-analyze")
    need_tool("nft")
    unit = tmp_path / "dstack-vpn-firewall.service"
    unit.write_text(render.render("systemd/dstack-vpn-firewall.service", rules_path=firewall.RULES_PATH))
    dropin = tmp_path / "dstack-vpn-firewall.service.d"
    dropin.mkdir()
    (dropin / "forwarding.conf").write_text(render.render("systemd/dstack-vpn-firewall-forwarding.conf"))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # forwarding is a post-step of loading the ruleset, not a sysctl.d file applied at early boot
    assert "ExecStartPost=/usr/sbin/sysctl -q -w net.ipv4.ip_forward=1" in (dropin / "forwarding.conf").read_text()
    script = render.script("forwarding", "scripts/forwarding.sh", **forwarding.values())
    assert script.index("nft list table inet dstack_vpn") < script.index("sysctl -q -w net.ipv4.ip_forward=1")


def test_nudge_unit_reaches_only_the_hub_overlay_address(tmp_path):
    text = render.render("systemd/dstack-vpn-nudge.service", **SCRIPT_VALUES["wireguard"])
    assert "IPAddressDeny=any\nIPAddressAllow=10.88.0.1\n" in text


@pytest.mark.parametrize("kind,blocked", [("droplet", True), ("ssh", False)])
def test_only_root_reaches_the_metadata_service_on_droplets(cfg, tmp_path, kind, blocked):
    spoke = next(s for s in cfg.spokes if s.kind == kind)
    text = render.render("nftables/spoke.nft", **firewall.values(spoke_node(cfg, spoke)))
    nft_check(tmp_path, text)
    assert ("ip daddr 169.254.169.254 meta skuid != 0 drop" in text) == blocked
    assert "ip daddr 169.254.169.254 meta skuid != 0 drop" in render.render("nftables/hub.nft", **firewall.values(hub_node(cfg)))


@pytest.mark.parametrize("cidrs", [["203.0.113.0/24", "2001:db8::/48"], []])
def test_status_cidrs_narrow_the_status_page_on_host_and_cloud(cfg, tmp_path, cidrs):
    narrowed = dataclasses.replace(cfg, status_cidrs=tuple(cidrs))
    spoke = next(s for s in narrowed.spokes if s.kind == "droplet")
    text = render.render("nftables/spoke.nft", **firewall.values(spoke_node(narrowed, spoke)))
    nft_check(tmp_path, text)
    assert ("elements = { 203.0.113.0/24 }" in text) == bool(cidrs)
    rules = topology.cloud_firewall_inbound(narrowed, spoke_node(narrowed, spoke).openings)
    status = [r for r in rules if r["port_range"] == str(cfg.status_port)]
    assert status == ([dict(protocol="tcp", port_range="8000", source_addresses=cidrs)] if cidrs else [])


def test_dhcp_replies_are_accepted_only_from_the_underlay_server_side(cfg, tmp_path):
    text = render.render("nftables/hub.nft", **firewall.values(hub_node(cfg)))
    dhcp = [line.strip() for line in text.splitlines() if "dport 68" in line or "dport 546" in line]
    assert dhcp == ["meta iiftype ether udp sport 67 udp dport 68 accept",
                    "meta iiftype ether ip6 saddr fe80::/10 udp sport 547 udp dport 546 accept"]


def test_cloud_init_is_yaml_with_the_host_key(cfg):
    import yaml
    private, public = keys.ssh_key_pair("host")
    text = render.render("cloud-init/droplet.yaml", host_private_key=private, host_public_key=public,
                         admin_ssh_keys=[HOST_KEY + " # odd: comment"])
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["ssh_keys"] == {"ed25519_private": private, "ed25519_public": public}
    assert data["ssh_genkeytypes"] == [] and data["ssh_deletekeys"] is True
    assert data["ssh_authorized_keys"] == [HOST_KEY + " # odd: comment"]


def test_missing_value_is_an_error():
    import jinja2
    with pytest.raises(jinja2.UndefinedError):
        render.render("wireguard/spoke.conf", private_key="x")


@pytest.mark.parametrize("cut", [None, 0, 10, -len(render.END_MARKER) - 1, -3])
def test_a_file_cut_short_on_the_way_changes_nothing(tmp_path, cut):
    """receive() installs a step's stdin file only when its end line arrived."""
    body = "[Interface]\nPrivateKey = x\n"
    sent = render.framed(body)
    if cut is not None:
        sent = sent[:cut]
    lib = render.script("test", "scripts/_lib.sh")
    dest = tmp_path / "wg0.conf"
    out = subprocess.run(["bash", "-c", lib + f'\nreceive {dest}'], input=sent, capture_output=True, text=True)
    if cut is None:
        assert out.returncode == 0, out.stderr
        assert dest.read_text() == body
    else:
        assert out.returncode != 0 and "incomplete" in out.stderr
        assert not dest.exists()
    assert list(tmp_path.iterdir()) == ([dest] if cut is None else [])


def test_every_step_script_includes_the_helpers_it_calls():
    """A helper called but not included fails only on a host (bash: command not found), after
    the step has begun: each script that calls one includes the file that defines it."""
    scripts = render.TEMPLATES / "scripts"
    helpers = {}
    for lib in sorted(scripts.glob("_*.sh")):
        for name in re.findall(r"^([a-z_]+)\(\) \{", lib.read_text(), re.M):
            helpers[name] = f"scripts/{lib.name}"
    assert {"say", "receive", "install_changed", "receive_bundle", "kernel_wireguard"} <= set(helpers)

    def included(path, seen=()):
        text = path.read_text()
        out = {path.name}
        for name in re.findall(r'{% include "scripts/(_[a-z_]+\.sh)" %}', text):
            if name not in seen:
                out |= included(scripts / name, (*seen, name))
        return out

    missing = []
    for script in sorted(scripts.glob("[!_]*.sh")):
        text, have = script.read_text(), included(script)
        missing += [(script.name, name) for name, lib in helpers.items()
                    if re.search(rf"(^|[\s;&|(!]){name}(\s|$)", text, re.M) and lib.split("/")[1] not in have]
    assert missing == []

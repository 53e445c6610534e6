"""Spokes behind hostile networks, without a lab: the settings (transport, tcpPort, mtu) and their
bad values, what each node gets from them (the hub's listener and opening, a spoke's endpoint and
relay, MTUs and the hub's MSS clamps), the files checked by the tools that read them (v2ray,
systemd, shellcheck, nft), and the watchdog's switching, run against stand-ins for `wg` and `ping`."""
import json
import os
import subprocess
import time

import pytest

from components import config, keys, render, topology
from components.nodes.remote import hub_node, install_step, spoke_node
from components.roles import firewall, hub_roles, spoke_roles, transport, wireguard
from conftest import need_tool
from test_render import nft_check

SSH_KEY = keys.ssh_key_pair("transport")[0]
HOST_KEY = keys.ssh_key_pair("transport-host")[1]
HUB_IP = "203.0.113.5"


def parse(spokes=None, **raw):
    raw.setdefault("adminCidrs", ["203.0.113.10/32"])
    raw.setdefault("sshPrivateKey", SSH_KEY)
    raw["spokes"] = spokes if spokes is not None else [
        {"name": "node-a", "kind": "droplet", "transport": "tcp"},
        {"name": "node-b", "kind": "ssh", "host": "198.51.100.21", "hostKey": HOST_KEY},
        {"name": "node-c", "kind": "ssh", "host": "198.51.100.22", "hostKey": HOST_KEY, "transport": "auto",
         "mtu": 1280}]
    return config.parse({k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()})


def spoke(cfg, name):
    return spoke_node(cfg, next(s for s in cfg.spokes if s.name == name), hub_endpoint=HUB_IP)


# -- settings ----------------------------------------------------------------------------

def test_defaults_are_todays_network():
    cfg = parse(spokes=[{"name": "node-b", "kind": "ssh", "host": "198.51.100.21", "hostKey": HOST_KEY}])
    assert (cfg.tcp_port, cfg.mtu, cfg.spokes[0].transport, cfg.spokes[0].mtu) == (443, None, "udp", None)
    assert cfg.tcp_spokes == ()


@pytest.mark.parametrize("spoke_settings, message", [
    ({"transport": "quic"}, "spokes[0].transport: 'quic' is not a transport; allowed: udp"),
    ({"transport": ["tcp"]}, "spokes[0].transport: ['tcp'] is not a transport"),
    ({"mtu": 1279}, "spokes[0].mtu: 1279 is out of range; allowed 1280-9000"),
    ({"mtu": 9001}, "spokes[0].mtu: 9001 is out of range; allowed 1280-9000"),
    ({"mtu": "big"}, "spokes[0].mtu: expected an MTU in bytes, 1280-9000, got str"),
    ({"mtu": True}, "spokes[0].mtu: expected an MTU in bytes, 1280-9000, got True"),
])
def test_a_bad_spoke_setting_is_refused_naming_it(spoke_settings, message):
    with pytest.raises(config.ConfigError) as err:
        parse(spokes=[{"name": "node-a", "kind": "droplet", **spoke_settings}])
    assert message in str(err.value)


@pytest.mark.parametrize("raw, message", [
    ({"tcpPort": 22}, "tcpPort: 22 is SSH on the hub; choose another (default 443)"),
    ({"tcpPort": 8000}, "tcpPort: 8000 is the status port (statusPort)"),
    ({"tcpPort": 9443, "statusPort": 9443}, "tcpPort: 9443 is the status port (statusPort)"),
    ({"tcpPort": 51820}, "tcpPort: 51820 is WireGuard's port (listenPort)"),
    ({"tcpPort": 70000}, "tcpPort: port 70000 is out of range"),
    ({"mtu": 1000}, "mtu: 1000 is out of range; allowed 1280-9000"),
    ({"mtu": "9001"}, "mtu: 9001 is out of range"),
])
def test_a_bad_network_setting_is_refused_naming_it(raw, message):
    with pytest.raises(config.ConfigError) as err:
        parse(**raw)
    assert message in str(err.value)


def test_settings_arrive_as_text_too():
    cfg = parse(tcpPort="8443", mtu="1400")
    assert (cfg.tcp_port, cfg.mtu) == (8443, 1400)


# -- what each node gets ---------------------------------------------------------------------

def test_the_hub_listens_on_tcp_only_while_a_spoke_uses_it(tmp_path):
    cfg = parse()
    hub = hub_node(cfg)
    assert topology.Opening("tcp", 443, topology.PUBLIC) in hub.openings
    assert {"protocol": "tcp", "port_range": "443", "source_addresses": ["0.0.0.0/0", "::/0"]} in \
        topology.cloud_firewall_inbound(cfg, hub.openings)
    ruleset = render.render("nftables/hub.nft", **firewall.values(hub))
    nft_check(tmp_path, ruleset)
    assert "\t\ttcp dport 443 accept\n" in ruleset
    assert install_step(hub, hub_roles()).values["packages"] == ["wireguard-tools", "nftables", "v2ray"]

    plain = parse(spokes=[{"name": "node-b", "kind": "ssh", "host": "198.51.100.21", "hostKey": HOST_KEY,
                           "transport": "udp"}])
    hub = hub_node(plain)
    assert [o.port for o in hub.openings] == [22, 51820]
    assert "dport 443" not in render.render("nftables/hub.nft", **firewall.values(hub))
    assert install_step(hub, hub_roles()).values["packages"] == ["wireguard-tools", "nftables"]
    (step,) = transport.HUB.steps(hub)
    assert step.stdin is None and not step.values["enabled"]
    script = render.script("transport", "scripts/transport.sh", **step.values)
    assert "v2ray -test" not in script and "systemctl disable --now --quiet dstack-vpn-tcp.service" in script


def test_only_a_spoke_that_uses_tcp_installs_and_runs_the_relay():
    cfg = parse()
    installs = {s.name: install_step(spoke(cfg, s.name), spoke_roles()).values["packages"] for s in cfg.spokes}
    assert installs == {"node-a": ["wireguard-tools", "iputils-ping", "nftables", "v2ray"],
                        "node-b": ["wireguard-tools", "iputils-ping", "nftables"],
                        "node-c": ["wireguard-tools", "iputils-ping", "nftables", "v2ray"]}
    (step,) = transport.SPOKE.steps(spoke(cfg, "node-b"))
    assert step.stdin is None and step.after == ("firewall",)
    (step,) = transport.SPOKE.steps(spoke(cfg, "node-a"))
    assert "hub/transport" in step.after  # the hub listens first


def _conf(cfg, name):
    node = spoke(cfg, name)
    return wireguard.spoke_conf(node, keys.wireguard_private_key(), None, keys.wireguard_public_key(
        keys.wireguard_private_key()), HUB_IP)


def test_a_spokes_endpoint_mtu_and_watchdog_follow_its_transport(tmp_path):
    cfg = parse()
    assert "Endpoint = 127.0.0.1:51821\n" in _conf(cfg, "node-a") and "MTU = 1420\n" in _conf(cfg, "node-a")
    assert "Endpoint = 203.0.113.5:51820\n" in _conf(cfg, "node-b") and "MTU" not in _conf(cfg, "node-b")
    assert "Endpoint = 203.0.113.5:51820\n" in _conf(cfg, "node-c") and "MTU = 1200\n" in _conf(cfg, "node-c")
    for name in ("node-a", "node-b", "node-c"):
        path = tmp_path / f"{name}.conf"
        path.write_text(_conf(cfg, name))
        if need_tool("wg-quick"):
            out = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
    units = {}
    for name in ("node-a", "node-c"):
        values = wireguard.interface_values(spoke(cfg, name))
        values["auto"] = values["auto"] and "203.0.113.5:51820 127.0.0.1:51821"  # (an output, resolved)
        units[name] = render.render("systemd/dstack-vpn-nudge.service", **values)
    assert f"ExecStart=/bin/bash {wireguard.WATCHDOG} wg0 10.88.0.1\n" in units["node-a"]
    assert f"ExecStart=/bin/bash {wireguard.WATCHDOG} wg0 10.88.0.1 203.0.113.5:51820 127.0.0.1:51821\n" \
        in units["node-c"]


def test_the_network_mtu_reaches_the_hub_and_the_spokes_without_their_own():
    cfg = parse(mtu=1400)
    hub = wireguard.hub_conf(hub_node(cfg), keys.wireguard_private_key(), [])
    assert "MTU = 1320\n" in hub
    assert "MTU = 1320\n" in _conf(cfg, "node-a") and "MTU = 1320\n" in _conf(cfg, "node-b")
    assert "MTU = 1200\n" in _conf(cfg, "node-c")  # its own


def test_the_hub_clamps_the_mss_of_spokes_on_smaller_paths(tmp_path):
    cfg = parse()
    assert wireguard.mss_clamps(hub_node(cfg)) == [{"address": "10.88.0.13", "mss": 1160}]
    ruleset = render.render("nftables/hub.nft", **firewall.values(hub_node(cfg)))
    nft_check(tmp_path, ruleset)
    forward = ruleset[ruleset.index("chain forward"):ruleset.index("chain output")]
    for way in ("daddr", "saddr"):
        assert (f'iifname "wg0" oifname "wg0" ip {way} 10.88.0.13 tcp flags & (syn | rst) == syn '
                "tcp option maxseg size > 1160 counter tcp option maxseg size set 1160\n") in forward
    # before the forwarding rule that accepts (the clamp is no verdict)
    assert forward.index("maxseg") < forward.index('oifname "wg0" accept')
    # the same path everywhere: nothing to clamp, and today's ruleset
    assert wireguard.mss_clamps(hub_node(parse(mtu=1400, spokes=[{"name": "node-a", "kind": "droplet"}]))) == []
    assert "maxseg" not in render.render("nftables/hub.nft", **firewall.values(hub_node(parse(spokes=[]))))


# -- the files, checked by what reads them -------------------------------------------------

def test_v2ray_accepts_both_configurations_and_the_hub_forwards_to_wireguard_alone(tmp_path):
    v2ray = need_tool("v2ray")
    cfg = parse()
    hub, node = transport.hub_config(hub_node(cfg)), transport.spoke_config(spoke(cfg, "node-a"), HUB_IP)
    for name, text in (("hub", hub), ("spoke", node)):
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        out = subprocess.run([v2ray, "-test", "-config", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and "Configuration OK" in out.stdout, out.stdout + out.stderr
    hub, node = json.loads(hub), json.loads(node)
    assert hub["outbounds"] == [{"protocol": "freedom", "settings": {"redirect": "127.0.0.1:51820"}}]
    assert hub["inbounds"][0]["port"] == 443
    assert node["inbounds"][0]["listen"] == "127.0.0.1" and node["inbounds"][0]["settings"]["network"] == "udp"
    assert node["outbounds"][0]["settings"]["vnext"][0]["address"] == HUB_IP


@pytest.mark.parametrize("who", ["hub", "spoke"])
def test_the_tcp_unit_verifies(who, tmp_path):
    need_tool("systemd-analyze")
    need_tool("v2ray")
    cfg = parse()
    node = hub_node(cfg) if who == "hub" else spoke(cfg, "node-a")
    values = transport.step_values(node, allow=None if who == "hub" else HUB_IP)
    unit = tmp_path / "dstack-vpn-tcp.service"
    unit.write_text(render.render("systemd/dstack-vpn-tcp.service", **values))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = unit.read_text()
    assert "DynamicUser=yes\n" in text and f"LoadCredential=config:{transport.CONFIG_PATH}\n" in text
    if who == "hub":
        assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in text
    else:
        assert "CapabilityBoundingSet=\n" in text and f"IPAddressAllow={HUB_IP} 127.0.0.1\n" in text


@pytest.mark.parametrize("who", ["hub", "tcp", "udp"])
@pytest.mark.parametrize("undo", [False, True])
def test_the_transport_scripts_pass_shellcheck(who, undo, tmp_path):
    shellcheck = need_tool("shellcheck")
    cfg = parse()
    node = {"hub": hub_node(cfg), "tcp": spoke(cfg, "node-a"), "udp": spoke(cfg, "node-b")}[who]
    values = transport.step_values(node, allow=None if who != "tcp" else HUB_IP)
    path = tmp_path / "step.sh"
    path.write_text(render.script("transport", f"scripts/transport{'-undo' if undo else ''}.sh", **values))
    out = subprocess.run([shellcheck, "-s", "bash", "-S", "warning", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# -- the watchdog under `auto`, against stand-ins ------------------------------------------

FAKE_WG = r"""#!/bin/bash
# wg, as far as the watchdog uses it: one peer, its endpoint in $STATE
case "$1 $3" in
"showconf "*) printf '[Interface]\nPrivateKey = x\n\n[Peer]\nPublicKey = HUB\nEndpoint = %s\n' "$(cat "$STATE")" ;;
"show peers") echo HUB ;;
"show endpoints") printf 'HUB\t%s\n' "$(cat "$STATE")" ;;
"syncconf "*) sed -n 's/^Endpoint = //p' "$3" >"$STATE.new" && mv "$STATE.new" "$STATE" ;;
"set "*) ;;
*) echo "fake wg: $*" >&2; exit 1 ;;
esac
"""
# ping answers only over the endpoint that works ($WORKS: udp, tcp or none)
FAKE_PING = r"""#!/bin/bash
case "$WORKS:$(cat "$STATE")" in
udp:198.51.100.1:51820 | tcp:127.0.0.1:51821) exit 0 ;;
*) exit 1 ;;
esac
"""


@pytest.fixture
def watchdog(tmp_path):
    """Run the watchdog for a while against the stand-ins: run(works, seconds, *endpoints) -> its log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("wg", FAKE_WG), ("ping", FAKE_PING), ("sleep", "#!/bin/sh\nexec /bin/sleep 0.05\n")):
        (bin_dir / name).write_text(text)  # (sleep: a second is 50 ms here)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "endpoint"
    state.write_text("198.51.100.1:51820\n")
    script = tmp_path / "watchdog.sh"
    script.write_text(render.render("wireguard/watchdog.sh", **wireguard.watchdog_values()))

    def run(works, seconds, *endpoints):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STATE": str(state), "WORKS": works}
        proc = subprocess.Popen(["bash", str(script), "lo", "10.88.0.1", *endpoints], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(seconds)
        proc.terminate()
        return proc.communicate(timeout=5)[0]

    run.endpoint = lambda: state.read_text().strip()
    return run


AUTO = ("198.51.100.1:51820", "127.0.0.1:51821")


def test_the_watchdog_moves_to_tcp_when_udp_is_silent_and_back_when_tcp_is(watchdog):
    log = watchdog("tcp", 2, *AUTO)  # UDP dropped: after AUTO_BOUND unanswered pings, the relay
    assert watchdog.endpoint() == "127.0.0.1:51821", log
    assert f"transport tcp (no answer over udp for {transport.AUTO_BOUND} s; udp again in 60 s)" in log
    assert "its peer set again, a fresh handshake" in log  # before that: the fresh handshake on UDP
    log = watchdog("tcp", 1, *AUTO)  # answered on TCP: it stays (its UDP try comes after 60 s)
    assert watchdog.endpoint() == "127.0.0.1:51821" and "transport" not in log, log
    log = watchdog("udp", 2, *AUTO)  # the relay silent (say the hub's TCP port closed): UDP again
    assert watchdog.endpoint() == "198.51.100.1:51820", log
    assert f"transport udp (no answer over tcp for {transport.AUTO_BOUND} s)" in log
    log = watchdog("udp", 1, *AUTO)
    assert "transport" not in log and watchdog.endpoint() == "198.51.100.1:51820", log


def test_without_two_endpoints_the_watchdog_only_renews_the_handshake(watchdog):
    log = watchdog("tcp", 2)  # a udp (or tcp) spoke: a silent hub gets fresh handshakes, nothing moves
    assert watchdog.endpoint() == "198.51.100.1:51820", log
    assert "transport" not in log and log.count("its peer set again, a fresh handshake") >= 2, log

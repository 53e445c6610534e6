"""Kind `client` (people's devices): the setting and its refusals, the config the device imports
(as wg-quick reads it, and as a QR code that decodes back to it exactly), the outputs kept
secret, the hub's peer, and the rulesets that let a client open only what its `allow` says. The
real thing (a device's namespace running wg-quick with the output) runs in
tests/e2e/test_lab_monitor.py."""
import base64
import json
import re
import subprocess

import pytest

import program
from components import config, render
from components.nodes import client
from components.nodes.remote import hub_node
from components.roles import client_flows, firewall, spoke_roles, wireguard
from conftest import need_tool
from test_postgres import PG, SPOKES, SSH_KEY, node, raw
from test_render import nft_check

CMD = "command:remote:Command"
LAPTOP = {"name": "laptop", "kind": "client", "address": "10.88.0.50"}
PHONE = {"name": "phone", "kind": "client", "allow": ["node-b"], "presharedKey": False, "mtu": 1400}
CLIENTS = SPOKES + [LAPTOP, PHONE]
MONITOR = {"node": "node-c"}
PG_CLIENTS = dict(PG, clients=["node-c", "laptop"])


def settings(spokes=None, pg=None, monitor=MONITOR, **more):
    values = raw(PG_CLIENTS if pg is None else pg, spokes or CLIENTS)
    if pg is False:
        del values["postgres"]
    if monitor is not None:
        values["monitor"] = json.dumps(monitor)
    values.update({k: json.dumps(v) for k, v in more.items()})
    return values


def parse(**kw):
    return config.parse(settings(**kw))


def by_name(cfg, name):
    return next(s for s in cfg.spokes if s.name == name)


# -- the setting -----------------------------------------------------------------------------

def test_a_client_is_a_spoke_of_its_own_kind_with_what_it_may_reach():
    cfg = parse()
    laptop, phone = by_name(cfg, "laptop"), by_name(cfg, "phone")
    assert [s.name for s in cfg.clients] == ["laptop", "phone"]
    assert "laptop" not in [s.name for s in cfg.hosts] and "node-d" in [s.name for s in cfg.hosts]
    # the default (the status pages and the monitor's page), and the database as a PostgreSQL client
    assert laptop.allow == ("status", "monitor", "postgres") and laptop.preshared_key
    assert phone.allow == ("node-b",) and not phone.preshared_key and phone.mtu == 1400
    assert phone.address == "10.88.0.16"  # the next free address


def test_without_a_monitor_the_default_is_the_status_pages():
    cfg = parse(pg=False, monitor=None)
    assert by_name(cfg, "laptop").allow == ("status",)


def test_config_names_the_roles_a_client_may_be_allowed():
    """CLIENT_TARGET_ROLES are exactly the spoke roles that serve clients on some port."""
    cfg = parse()
    serving = {r.name for r in spoke_roles() if r.client_ports(cfg)}
    assert serving == set(config.CLIENT_TARGET_ROLES)


@pytest.mark.parametrize("change, message", [
    ({"host": "198.51.100.30"}, r"spokes\[5\].host: not for kind 'client'.*never logs in"),
    ({"user": "root"}, r"spokes\[5\].user: not for kind 'client'"),
    ({"hostKey": "ssh-ed25519 AAAA"}, r"spokes\[5\].hostKey: not for kind 'client'"),
    ({"transport": "tcp"}, r"spokes\[5\].transport: not for kind 'client'"),
    ({"region": "fra1"}, r"spokes\[5\].region: not for kind 'client'"),
    ({"address": "10.88.0.12"}, r"spokes\[5\].address: 10.88.0.12 is already used by spokes\[1\]"),
    ({"address": "10.88.0.1"}, r"spokes\[5\].address: 10.88.0.1 is already used by the hub"),
    ({"address": "10.99.0.5"}, r"spokes\[5\].address: 10.99.0.5 is outside the overlay"),
    ({"allow": ["node-x"]}, r"spokes\[5\].allow\[0\]: 'node-x' is neither a node nor a role"),
    ({"allow": ["grafana"]}, r"spokes\[5\].allow\[0\]: 'grafana' is neither a node nor a role"),
    ({"allow": ["hub"]}, r"spokes\[5\].allow\[0\]: the hub serves nothing"),
    ({"allow": ["phone"]}, r"spokes\[5\].allow\[0\]: 'phone' is a client"),
    ({"allow": ["node-b", "node-b"]}, r"spokes\[5\].allow\[1\]: 'node-b' is listed twice"),
    ({"allow": "node-b"}, r"spokes\[5\].allow: expected a list"),
    ({"allow": [7]}, r"spokes\[5\].allow\[0\]: expected a node's name"),
    ({"name": "phone"}, r"spokes\[6\].name: 'phone' is used twice"),
])
def test_bad_client_settings_are_refused_naming_the_setting(change, message):
    with pytest.raises(config.ConfigError, match=message):
        parse(spokes=SPOKES + [dict(LAPTOP, **change), PHONE])


def test_the_database_and_the_monitor_only_where_there_are_such():
    with pytest.raises(config.ConfigError, match=r"spokes\[6\].allow\[0\]: 'phone' may reach the database only as "
                                                 "a PostgreSQL client: add it to postgres.clients"):
        parse(spokes=SPOKES + [LAPTOP, dict(PHONE, allow=["postgres"])])
    with pytest.raises(config.ConfigError, match=r"spokes\[5\].allow\[1\]: there is no monitor"):
        parse(spokes=SPOKES + [dict(LAPTOP, allow=["status", "monitor"]), PHONE], monitor=None)


def test_a_client_is_never_a_member_a_monitor_or_logged_in_to():
    with pytest.raises(config.ConfigError, match=r"postgres.members\[2\]: 'laptop' is a client"):
        parse(pg=dict(PG, members=["node-a", "node-b", "laptop"]))
    with pytest.raises(config.ConfigError, match="monitor.node: 'laptop' is a client"):
        parse(monitor={"node": "laptop"})
    with pytest.raises(config.ConfigError, match="nodeSecrets.laptop.sshPrivateKey: a client is a device"):
        parse(nodeSecrets={"laptop": {"sshPrivateKey": SSH_KEY}})


@pytest.mark.parametrize("bad", [
    dict(LAPTOP, host="198.51.100.30"),
    dict(LAPTOP, address="10.88.0.11"),
    dict(LAPTOP, allow=["node-x"]),
])
def test_bad_client_input_registers_nothing(bad):
    """Refused before any resource exists: no key, no droplet, no step."""
    stack = program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES + [bad], postgres=PG)
    with pytest.raises(Exception, match=r"invalid stack config: spokes\[5\]"):
        program.run(stack)


# -- the flows and the rulesets ----------------------------------------------------------------

def flows_of(cfg, client_name):
    address = by_name(cfg, client_name).address
    names = {s.address: s.name for s in cfg.spokes} | {"*": "*"}
    return {(names[f.node], f.proto, f.port) for f in client_flows(cfg) if f.client == address}


def test_a_client_opens_what_its_allow_names_and_nothing_else():
    cfg = parse()
    # the status page is on every spoke: one flow to them all (a new spoke changes no other ruleset)
    assert flows_of(cfg, "laptop") == ({("*", "tcp", 8000), ("node-c", "tcp", 9090)}
                                       | {(m, "tcp", 5432) for m in PG["members"]})
    assert flows_of(cfg, "phone") == {("node-b", None, None)}


def test_the_rulesets_with_clients_load_and_keep_limited_ports(tmp_path):
    cfg = parse()
    laptop, phone = by_name(cfg, "laptop").address, by_name(cfg, "phone").address
    hub = render.render("nftables/hub.nft", **firewall.values(hub_node(cfg)))
    nft_check(tmp_path, hub)
    assert f'ip daddr {{ {laptop}, {phone} }} drop' in hub
    assert f'ip saddr {laptop} ip daddr 10.88.0.13 tcp dport 9090 accept' in hub
    assert f'ip saddr {phone} ip daddr 10.88.0.12 accept' in hub
    assert f'ip saddr {laptop} tcp dport 8000 accept' in hub
    lines = hub.splitlines()
    order = [next(i for i, line in enumerate(lines) if key in line) for key in (
        "ct state established,related accept", f"ip daddr {{ {laptop}, {phone} }} drop",
        f"ip saddr {laptop} ip daddr", f"ip saddr {{ {laptop}, {phone} }} drop",
        'iifname "wg0" oifname "wg0" accept')]
    assert order == sorted(order), hub

    for name in ("node-a", "node-b", "node-c"):
        values = firewall.values(node(cfg, name))
        text = render.render("nftables/spoke.nft", **values)
        nft_check(tmp_path, text)
        assert f'ip saddr {{ {laptop}, {phone} }} drop' in text
    member = firewall.values(node(cfg, "node-a"))
    limits = {limit.port: limit.addresses for limit in member["overlay_limits"]}
    assert laptop in limits[5432] and phone not in limits[5432] and laptop not in limits[8008]
    monitor = {limit.port: limit.addresses for limit in firewall.values(node(cfg, "node-c"))["overlay_limits"]}
    assert monitor[9090] == ("10.88.0.13", laptop)
    # node-b is the phone's whole: every port but those a role keeps to others (none there)
    text = render.render("nftables/spoke.nft", **firewall.values(node(cfg, "node-b")))
    assert f'iifname "wg0" ip saddr {phone} accept' in text
    assert f'iifname "wg0" ip saddr {phone} accept' not in render.render(
        "nftables/spoke.nft", **firewall.values(node(cfg, "node-a")))
    # a dstack app's compose file is its measured configuration: clients coming and going leave it
    # as it was (the hub checks their flows to it)
    without = parse(spokes=SPOKES, pg=PG)
    assert firewall.dstack_values(node(cfg, "node-d")) == firewall.dstack_values(node(without, "node-d"))


def test_without_clients_the_rulesets_are_as_before():
    """A stack with no client renders no client rule (its hosts see no change)."""
    cfg = parse(spokes=SPOKES, pg=PG)
    texts = [render.render("nftables/hub.nft", **firewall.values(hub_node(cfg))),
             render.render("nftables/spoke.nft", **firewall.values(node(cfg, "node-a"))),
             render.render("nftables/dstack.nft", **firewall.dstack_values(node(cfg, "node-d")))]
    assert not [t for t in texts if "clients" in t or "established,related accept\n\t\tiifname" in t]


# -- the program -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run():
    return program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=CLIENTS, postgres=PG_CLIENTS,
                                            monitor=MONITOR))


def config_field(text, key):
    return re.search(rf"^{key} = (.+)$", text, re.M).group(1)


def test_the_outputs_are_secret_and_hold_a_config_per_client(run):
    assert "clients" in run.secret_outputs
    clients = run.outputs["clients"]
    assert sorted(clients) == ["laptop", "phone"]
    for name, out in clients.items():
        text = out["config"]
        assert config_field(text, "Address") == run.outputs["nodes"][name]["address"] + "/32"
        assert config_field(text, "AllowedIPs") == "10.88.0.0/24"
        assert config_field(text, "PublicKey") == run.outputs["nodes"]["hub"]["public_key"]
        assert config_field(text, "Endpoint").endswith(":51820")
    assert config_field(clients["phone"]["config"], "MTU") == "1320" and "PresharedKey" not in clients["phone"]["config"]
    assert "PresharedKey" in clients["laptop"]["config"] and "MTU" not in clients["laptop"]["config"]


def test_the_config_is_what_wg_quick_reads(run, tmp_path):
    need_tool("wg-quick")
    need_tool("wg")
    for name, out in run.outputs["clients"].items():
        path = tmp_path / f"{name}.conf"
        path.write_text(out["config"])
        path.chmod(0o600)
        stripped = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True)
        assert stripped.returncode == 0, stripped.stderr
        assert "Address" not in stripped.stdout and "MTU" not in stripped.stdout
        # what wg itself is given: the keys, the hub's endpoint and the overlay, as in the config
        for key in ("PrivateKey", "PublicKey", "Endpoint", "AllowedIPs", "PersistentKeepalive"):
            assert config_field(stripped.stdout, key) == config_field(out["config"], key)
        private = config_field(out["config"], "PrivateKey")
        public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True).stdout.strip()
        assert public == run.outputs["nodes"][name]["public_key"]


def decode(matrix_rows):
    import numpy
    import zxingcpp
    image = numpy.array(matrix_rows, dtype=numpy.uint8)
    return [r.text for r in zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)]


def png_pixels(data: bytes):
    import png
    width, height, rows, info = png.Reader(bytes=data).asDirect()
    scale = 255 // (2 ** info["bitdepth"] - 1)
    return [[v * scale for v in row] for row in rows]


HALF_BLOCKS = {"█": (255, 255), "▀": (255, 0), "▄": (0, 255), " ": (0, 0), "\xa0": (0, 0)}


def text_pixels(text: str, scale: int = 4):
    """The terminal text back to pixels: each character two modules high, light where drawn."""
    rows = []
    for line in text.rstrip("\n").split("\n"):
        top = [HALF_BLOCKS[c][0] for c in line]
        bottom = [HALF_BLOCKS[c][1] for c in line]
        for row in (top, bottom):
            wide = [v for v in row for _ in range(scale)]
            rows += [wide] * scale
    return rows


def test_the_qr_codes_decode_to_exactly_the_config(run, tmp_path):
    for name, out in run.outputs["clients"].items():
        png = base64.b64decode(out["qrPng"])
        assert png.startswith(b"\x89PNG")
        assert decode(png_pixels(png)) == [out["config"]]
        assert decode(text_pixels(out["qrText"])) == [out["config"]]


def test_a_qr_code_is_of_its_own_text():
    """The decoder is no rubber stamp: another text gives another code."""
    a, b = client.qr_png("[Interface]\nPrivateKey = a\n"), client.qr_png("[Interface]\nPrivateKey = b\n")
    assert decode(png_pixels(a)) == ["[Interface]\nPrivateKey = a\n"] and decode(png_pixels(b)) != decode(png_pixels(a))


def test_no_client_key_in_any_plain_input_command_text_or_plain_output(run):
    secrets = {}
    for name, out in run.outputs["clients"].items():
        secrets[f"{name} private key"] = config_field(out["config"], "PrivateKey")
        if "PresharedKey" in out["config"]:
            secrets[f"{name} preshared key"] = config_field(out["config"], "PresharedKey")
    assert len(secrets) == 3
    assert program.secret_leaks(run, secrets) == []
    # and the private keys are in the hub's peer step nowhere: it gets the public key alone
    hub = program.unwrap(run.named("hub-wireguard", CMD).inputs["stdin"])
    assert secrets["laptop private key"] not in hub and secrets["laptop preshared key"] in hub
    assert run.outputs["nodes"]["laptop"]["public_key"] in hub and run.outputs["nodes"]["phone"]["public_key"] in hub


def test_a_client_gets_no_step_and_no_machine(run):
    names = {r.name for r in run.registrations}
    assert not [n for n in names if n.startswith(("laptop", "phone")) and not n.endswith(("-wg-key", "-psk"))], names
    # it is no scrape target of the monitor, and no host of any role
    files = json.loads(program.unwrap(run.named("node-c-monitor", CMD).inputs["stdin"]).rsplit("\n", 2)[0])
    assert "node-a" in files["prometheus.yml"]
    assert not [t for t in ("laptop", "phone", "10.88.0.50", "10.88.0.16") if t in files["prometheus.yml"]]


def test_rotating_a_clients_key_changes_its_peer_and_nothing_else():
    stack = dict(sshPrivateKey=SSH_KEY, postgres=PG_CLIENTS, monitor=MONITOR)
    before = program.run(program.stack_config(spokes=CLIENTS, **stack), seed="rotate")
    after = program.run(program.stack_config(spokes=SPOKES + [dict(LAPTOP, keyRotation=1), PHONE], **stack),
                        seed="rotate")
    keys = lambda r: {n: v["public_key"] for n, v in r.outputs["nodes"].items()}  # noqa: E731
    changed = {n for n in keys(before) if keys(before)[n] != keys(after)[n]}
    assert changed == {"laptop"}
    old = config_field(before.outputs["clients"]["laptop"]["config"], "PrivateKey")
    assert old != config_field(after.outputs["clients"]["laptop"]["config"], "PrivateKey")
    hub = program.unwrap(after.named("hub-wireguard", CMD).inputs["stdin"])
    assert keys(before)["laptop"] not in hub and keys(after)["laptop"] in hub


def test_removing_a_client_takes_its_peer_and_rules_away():
    stack = dict(sshPrivateKey=SSH_KEY, postgres=PG, monitor=MONITOR)
    with_both = program.run(program.stack_config(spokes=SPOKES + [dict(LAPTOP, allow=["status"]), PHONE], **stack),
                            seed="remove")
    without = program.run(program.stack_config(spokes=SPOKES + [dict(LAPTOP, allow=["status"])], **stack),
                          seed="remove")
    phone_key = with_both.outputs["nodes"]["phone"]["public_key"]
    hub = program.unwrap(without.named("hub-wireguard", CMD).inputs["stdin"])
    assert phone_key not in hub
    for name in ("node-a", "node-b", "node-c", "node-e"):
        assert with_both.outputs["nodes"][name] == without.outputs["nodes"][name]
        assert "10.88.0.16" not in program.unwrap(without.named(f"{name}-firewall", CMD).inputs["stdin"])
    assert sorted(without.outputs["clients"]) == ["laptop"]
    # the dstack app's compose file (its measured configuration) is the same either way
    assert with_both.outputs["dstackCompose"] == without.outputs["dstackCompose"]


def test_a_preview_with_clients_runs():
    run = program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=CLIENTS, postgres=PG_CLIENTS,
                                           monitor=MONITOR), preview=True)
    assert run.named("hub-wireguard", CMD)


def test_the_mtu_and_clamp_of_a_client_are_the_hubs_too():
    cfg = parse()
    assert {"address": by_name(cfg, "phone").address, "mss": 1400 - 80 - 40} in wireguard.mss_clamps(hub_node(cfg))


def test_the_monitor_names_a_clients_peer_and_keeps_it_out_of_the_handshake_alert(tmp_path):
    from components.roles import monitor
    promtool = need_tool("promtool")
    cfg = parse(monitor={"node": "node-c", "hubMetrics": True})
    peers = [{"name": s.name, "public_key": f"{s.name}+key/{i}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
              "client": s.kind == "client"} for i, s in enumerate(cfg.spokes)]
    path = tmp_path / "prometheus.yml"
    path.write_text(monitor.prometheus_config(cfg, peers))
    (tmp_path / "rules.yml").write_text(monitor.rules(cfg))
    (tmp_path / "postgres-ca.crt").write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    import yaml
    hub = next(j for j in yaml.safe_load(path.read_text())["scrape_configs"] if j["job_name"] == "hub")
    kinds = {r["regex"].split("\\+")[0]: r["replacement"] for r in hub["metric_relabel_configs"]
             if r["target_label"] == "kind"}
    assert kinds == {"laptop": "client", "phone": "client"}
    assert 'kind!="client"' in monitor.rules(cfg)


def test_qr_codes_of_many_configs_decode_exactly():
    """Keys are random: 20 configs with fresh keys, each read back from the PNG and the text."""
    from components import keys
    cfg = parse()
    phone = by_name(cfg, "laptop")
    for _ in range(20):
        private, psk, hub = keys.make("wireguard")["private_key"], keys.make("preshared")["private_key"], \
            keys.make("wireguard")["public_key"]
        text = client.config(cfg, phone, private, psk, hub, "203.0.113.7")
        assert decode(png_pixels(client.qr_png(text))) == [text]
        assert decode(text_pixels(client.qr_text(text))) == [text]

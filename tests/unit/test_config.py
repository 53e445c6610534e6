"""Every config rule: a bad case refused with a message naming the setting, and a good case."""
import copy
import dataclasses
import json

import pytest

from components import config
from components.config import ConfigError
from components.keys import ssh_key_pair, wireguard_private_key

SSH_KEY = ssh_key_pair("test")[0]
HOST_KEY = ssh_key_pair("host")[1]
WG_KEY = wireguard_private_key()


def base(**overrides):
    raw = {
        "adminCidrs": ["203.0.113.10/32"],
        "sshPrivateKey": SSH_KEY,
        "spokes": [
            {"name": "node-a", "kind": "droplet"},
            {"name": "node-b", "kind": "ssh", "host": "198.51.100.21", "hostKey": HOST_KEY},
            {"name": "node-c", "kind": "ssh", "host": "198.51.100.22", "user": "deploy", "hostKey": HOST_KEY},
        ],
    }
    raw.update(overrides)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items() if v is not None}


def with_spoke(i, **changes):
    spokes = copy.deepcopy(json.loads(base()["spokes"]))
    spokes[i].update(changes)
    for k, v in list(spokes[i].items()):
        if v is None:
            del spokes[i][k]
    return base(spokes=spokes)


def refused(raw, *words):
    with pytest.raises(ConfigError) as err:
        config.parse(raw)
    for word in words:
        assert word in str(err.value), str(err.value)
    return str(err.value)


def test_good_config_and_defaults():
    cfg = config.parse(base())
    assert cfg.overlay == "10.88.0.0/24" and cfg.listen_port == 51820 and cfg.interface == "wg0"
    assert cfg.hub.address == "10.88.0.1"
    assert [s.address for s in cfg.spokes] == ["10.88.0.11", "10.88.0.12", "10.88.0.13"]
    assert cfg.spokes[0].region == "nyc3" and cfg.spokes[0].size == "s-1vcpu-1gb"
    assert cfg.spokes[2].user == "deploy"
    assert all(s.preshared_key for s in cfg.spokes)


def test_free_addresses_skip_explicit_ones():
    spokes = [{"name": "a", "kind": "droplet", "address": "10.88.0.11"}, {"name": "b", "kind": "droplet"},
              {"name": "c", "kind": "droplet", "address": "10.88.0.12"}]
    cfg = config.parse(base(spokes=spokes))
    assert [s.address for s in cfg.spokes] == ["10.88.0.11", "10.88.0.13", "10.88.0.12"]


def test_duplicate_spoke_names():
    refused(with_spoke(1, name="node-a"), "spokes[1].name", "used twice")


def test_spoke_named_like_the_hub():
    refused(with_spoke(0, name="hub"), "spokes[0].name", "hub")


@pytest.mark.parametrize("name", ["Node", "node_a", "-a", "a-", "9a", "", "a" * 33, "a.b", "a b"])
def test_name_unusable_in_resource_names(name):
    refused(with_spoke(0, name=name), "spokes[0].name", "lowercase")


def test_name_missing():
    refused(with_spoke(0, name=None), "spokes[0].name")


@pytest.mark.parametrize("cidr,words", [
    ("8.8.8.0/24", ("overlayCidr", "private IPv4")),
    ("fd00::/64", ("overlayCidr", "private IPv4")),
    ("10.88.0.1/24", ("overlayCidr", "not a network")),
    ("banana", ("overlayCidr", "not a network")),
    ("10.0.0.0/16", ("overlayCidr", "overlaps dstack")),
    ("10.0.2.0/25", ("overlayCidr", "overlaps dstack")),
    ("10.0.0.0/8", ("overlayCidr", "overlaps dstack")),
    ("10.88.0.0/30", ("overlayCidr", "too small")),
])
def test_bad_overlay(cidr, words):
    refused(base(overlayCidr=cidr), *words)


def test_overlay_too_small_for_the_spokes():
    refused(base(overlayCidr="10.88.0.0/29"), "overlayCidr", "too small for 3 spokes")
    spokes = [{"name": f"n{i}", "kind": "droplet"} for i in range(3)]
    assert len(config.parse(base(overlayCidr="10.88.0.0/27", spokes=spokes)).spokes) == 3


@pytest.mark.parametrize("address,words", [
    ("10.89.0.5", ("spokes[0].address", "outside the overlay")),
    ("10.88.0.0", ("spokes[0].address", "network or broadcast")),
    ("10.88.0.255", ("spokes[0].address", "network or broadcast")),
    ("10.88.0.1", ("spokes[0].address", "the hub")),
    ("not-an-ip", ("spokes[0].address", "not an IPv4 address")),
])
def test_bad_address(address, words):
    refused(with_spoke(0, address=address), *words)


def test_address_used_twice():
    spokes = [{"name": "a", "kind": "droplet", "address": "10.88.0.20"},
              {"name": "b", "kind": "droplet", "address": "10.88.0.20"}]
    refused(base(spokes=spokes), "spokes[1].address", "already used by spokes[0]")


@pytest.mark.parametrize("port", [0, 65536, -1, "x", True])
def test_listen_port_out_of_range(port):
    refused(base(listenPort=port), "listenPort")


def test_dstack_port_refused():
    refused(base(listenPort=9182), "listenPort", "dstack")


def test_ssh_port_out_of_range():
    refused(with_spoke(1, port=70000), "spokes[1].port", "out of range")


@pytest.mark.parametrize("cidrs", [["203.0.113.300/32"], ["203.0.113.10/24"], ["x"], "203.0.113.0/24"])
def test_bad_admin_cidr(cidrs):
    refused(base(adminCidrs=cidrs), "adminCidrs")


def test_admin_cidrs_required_and_not_empty():
    refused(base(adminCidrs=None), "adminCidrs", "required")
    refused(base(adminCidrs=[]), "adminCidrs", "empty")


def test_ssh_spoke_without_host():
    refused(with_spoke(1, host=None), "spokes[1].host", "required")


def test_ssh_spoke_without_key():
    refused(base(sshPrivateKey=None), "spokes[1]", "SSH private key")


def test_ssh_spoke_with_its_own_key():
    raw = base(sshPrivateKey=None, spokes=[{"name": "b", "kind": "ssh", "host": "h", "hostKey": HOST_KEY}],
               nodeSecrets={"b": {"sshPrivateKey": SSH_KEY}})
    assert config.parse(raw).spokes[0].ssh_private_key == SSH_KEY


def test_host_key_required_unless_explicitly_waived():
    refused(with_spoke(1, hostKey=None), "spokes[1].hostKey", "allowUnknownHostKey")
    cfg = config.parse(with_spoke(1, hostKey=None, allowUnknownHostKey=True))
    assert cfg.spokes[1].host_key is None and cfg.spokes[1].allow_unknown_host_key


def test_bad_host_key():
    refused(with_spoke(1, hostKey="AAAA"), "spokes[1].hostKey")


@pytest.mark.parametrize("key", ["short", "A" * 44, "!!!!" * 11, WG_KEY[:-4]])
def test_pinned_key_not_valid(key):
    message = refused(base(nodeSecrets={"node-b": {"wireguardPrivateKey": key}}),
                      "nodeSecrets.node-b.wireguardPrivateKey", "32 bytes")
    assert key not in message  # never quote a secret


def test_pinned_key_good():
    hub_key = wireguard_private_key()
    cfg = config.parse(base(nodeSecrets={"node-b": {"wireguardPrivateKey": WG_KEY}, "hub": {"wireguardPrivateKey": hub_key}}))
    assert cfg.spokes[1].wireguard_private_key == WG_KEY and cfg.hub.wireguard_private_key == hub_key
    assert WG_KEY not in repr(cfg)


def test_one_pinned_key_on_two_nodes_is_refused_without_quoting_it():
    """The hub would route both addresses to whichever peer it set last."""
    message = refused(base(nodeSecrets={"node-b": {"wireguardPrivateKey": WG_KEY},
                                        "node-c": {"wireguardPrivateKey": " " + WG_KEY + "\n"}}),
                      "nodeSecrets.node-c.wireguardPrivateKey", "nodeSecrets.node-b.wireguardPrivateKey")
    assert WG_KEY not in message


def test_secrets_for_unknown_node():
    refused(base(nodeSecrets={"node-x": {"wireguardPrivateKey": WG_KEY}}), "nodeSecrets", "node-x")


@pytest.mark.parametrize("raw,where", [
    (base(overlayCIDR="10.88.0.0/24"), "overlayCIDR"),
    (with_spoke(1, hots="x"), "hots"),
    (base(nodeSecrets={"node-b": {"wireguardKey": WG_KEY}}), "wireguardKey"),
])
def test_unknown_setting_is_an_error(raw, where):
    refused(raw, "unknown setting", where)


def test_bad_kind():
    refused(with_spoke(0, kind="vm"), "spokes[0].kind", "ssh, droplet")


def test_droplet_settings_on_ssh_spoke_and_back():
    refused(with_spoke(1, region="nyc3"), "spokes[1].region", "droplet")
    refused(with_spoke(0, host="x"), "spokes[0].host", "ssh")


@pytest.mark.parametrize("iface", ["dstack-wg0", "a" * 16, "wg 0", ""])
def test_bad_interface(iface):
    refused(base(interface=iface), "interface")


def test_bad_ssh_private_key():
    message = refused(base(sshPrivateKey="hunter2-not-a-key"), "sshPrivateKey")
    assert "hunter2" not in message


def test_bad_admin_ssh_key():
    refused(base(adminSshKeys=["nope"]), "adminSshKeys[0]")
    assert config.parse(base(adminSshKeys=[HOST_KEY])).admin_ssh_keys == (HOST_KEY,)


def test_example_stack_file_is_valid_once_the_key_is_set():
    import program
    cfg = config.parse({k: v if isinstance(v, str) else json.dumps(v)
                        for k, v in program.stack_config(sshPrivateKey=SSH_KEY).items()})
    assert [(s.name, s.address, s.kind) for s in cfg.spokes] == [
        ("node-a", "10.88.0.11", "droplet"), ("node-b", "10.88.0.12", "ssh"), ("node-c", "10.88.0.13", "ssh"),
        ("laptop", "10.88.0.50", "client")]
    assert cfg.clients[0].allow == ("status", "monitor", "postgres")
    # and without the key it says exactly what is missing
    with pytest.raises(ConfigError, match="sshPrivateKey"):
        config.parse({k: v if isinstance(v, str) else json.dumps(v) for k, v in program.stack_config().items()})



# -- hostile input: what a careless or hostile setting must never turn into ----------------------

# (setting, a good value, how to put it in the config)
def _top(key):
    return lambda v: base(**{key: v})


def _spoke(i, key):
    return lambda v: with_spoke(i, **{key: v})


VALIDATED = {
    "interface": ("wg0", _top("interface")),
    "hubRegion": ("nyc3", _top("hubRegion")),
    "hubSize": ("s-1vcpu-1gb", _top("hubSize")),
    "hubImage": ("ubuntu-24-04-x64", _top("hubImage")),
    "spokes[0].name": ("node-a", _spoke(0, "name")),
    "spokes[0].region": ("nyc3", _spoke(0, "region")),
    "spokes[0].image": ("ubuntu-24-04-x64", _spoke(0, "image")),
    "spokes[1].user": ("deploy", _spoke(1, "user")),
    "spokes[1].host": ("db1.example.com", _spoke(1, "host")),
    "spokes[1].hostKey": (HOST_KEY, _spoke(1, "hostKey")),
    "spokes[1].port": ("2222", _spoke(1, "port")),
    "adminSshKeys[0]": (HOST_KEY, lambda v: base(adminSshKeys=[v])),
    "statusPort": ("8080", _top("statusPort")),
    "listenPort": ("51821", _top("listenPort")),
}
# What each is tried with: a trailing newline (`$` matched before it), a NUL, look-alikes.
HOSTILE = {
    "trailing newline": lambda v: v + "\n",
    "NUL": lambda v: v[:2] + "\x00" + v[2:],
    "Cyrillic o": lambda v: v.replace("o", "\u043e", 1) if "o" in v else "\u043e" + v,
    "fullwidth digit": lambda v: v.replace(v[0], chr(0xFF10 + int(v[0])), 1) if v[0].isdigit() else v + "\uff11",
    "newline inside": lambda v: v[:2] + "\n" + v[2:],
}


@pytest.mark.parametrize("setting", sorted(VALIDATED))
def test_every_validator_takes_the_plain_value(setting):
    good, put = VALIDATED[setting]
    config.parse(put(good))


@pytest.mark.parametrize("how", sorted(HOSTILE))
@pytest.mark.parametrize("setting", sorted(VALIDATED))
def test_every_validator_refuses_hidden_characters(setting, how):
    good, put = VALIDATED[setting]
    bad = HOSTILE[how](good)
    try:
        cfg = config.parse(put(bad))
    except ConfigError as err:
        assert str(err.value if hasattr(err, "value") else err).startswith(setting.split("[")[0]), (setting, how, err)
        return
    # Taken only as a plain value: surrounding whitespace stripped (a host, a key line) or a JSON
    # number read ("8080\n" is 8080). No hidden character is left anywhere in what was parsed.
    assert how == "trailing newline", (setting, how)
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from strings(v)
    hidden = [t for t in strings(dataclasses.asdict(cfg)) if "\n" in t.strip("\n") or t != t.strip("\n")
              or "\x00" in t or "\u043e" in t]
    assert not [t for t in hidden if "PRIVATE KEY" not in t], (setting, hidden)


def test_interface_with_a_newline_never_reaches_a_ruleset():
    """The hole: nft read `iifname != "wg0\n"`, which matches every interface."""
    refused(base(interface="wg0\n"), "interface")


@pytest.mark.parametrize("port", [22, 2222, 51820])
def test_a_status_port_on_ssh_or_wireguard_is_refused(port):
    raw = with_spoke(1, port=2222)
    raw["statusPort"] = str(port)
    message = refused(raw, "statusPort", str(port))
    assert ("SSH" in message) if port != 51820 else ("WireGuard" in message)


@pytest.mark.parametrize("host", ["198.51.100.1; reboot", "-oProxyCommand=touch /tmp/x", "a b", "$(id)", "host_1",
                                  "-h", "db1..example.com", "x" * 64 + ".example.com", "999.1.1.1", "db1.example.com/x"])
def test_an_ssh_host_must_be_a_name_or_an_address(host):
    refused(with_spoke(1, host=host), "spokes[1].host")


@pytest.mark.parametrize("host,kept", [("198.51.100.21", "198.51.100.21"), ("2001:db8::1", "2001:db8::1"),
                                       ("db1.example.com", "db1.example.com"), (" node-b ", "node-b")])
def test_names_and_addresses_are_taken(host, kept):
    assert config.parse(with_spoke(1, host=host)).spokes[1].host == kept


@pytest.mark.parametrize("cidr", ["10.88.0.0/24", "10.88.0.12/32", "10.0.0.0/8", "0.0.0.0/0"])
def test_admin_cidrs_overlapping_the_overlay_are_refused(cidr):
    refused(base(adminCidrs=["203.0.113.10/32", cidr]), "adminCidrs[1]", "overlaps the overlay")


def test_status_cidrs_default_to_everyone_and_can_be_narrowed():
    assert config.parse(base()).status_cidrs == ("0.0.0.0/0", "::/0")
    assert config.parse(base(statusCidrs=["203.0.113.0/24"])).status_cidrs == ("203.0.113.0/24",)
    assert config.parse(base(statusCidrs=[])).status_cidrs == ()
    refused(base(statusCidrs=["203.0.113.0/24\n"]), "statusCidrs[0]")

"""The status service's reading of `wg show <if> dump`, and what it builds from it.

Runs on dumps recorded from real WireGuard interfaces (see
fixtures/status/README.md); proves that no private or preshared key survives
the parser into any output.
"""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "status"


def _load_service():
    spec = importlib.util.spec_from_file_location("dstack_vpn_status", ROOT / "status" / "dstack_vpn_status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


svc = _load_service()

HUB = "srhWIN5T+BTQx1LV1XJDrZdCeAA6V0kqz7fUIVkXyUw="
HUB2 = "aRg6GEEfHnCFk28KRvuE5zPhDPkNnz9dA74O0LcvMCo="
BARE = "sBOHNkL41ZFqqCRF8niM4DJFpeYr3vGPIVj7iMK1Rio="
SILENT = "y5M20sIszd5imzym1ES2lKbF20AFsE/sfv6OR+t+pjM="
RECORDED_AT = 1795680890  # the handshakes in spoke.dump


def dump(name: str) -> str:
    return (FIXTURES / name).read_text()


def secrets_of(text: str) -> list:
    """The private key and preshared keys in a dump, read straight from the text."""
    lines = text.splitlines()
    found = [lines[0].split("\t")[0]] + [line.split("\t")[1] for line in lines[1:]]
    return [s for s in found if s != "(none)"]


def options(**overrides):
    values = dict(node_name="node-a", overlay_ip="10.88.0.11", interface="wg0",
                  hub_public_key=HUB, handshake_recent=180)
    values.update(overrides)
    return svc.argparse.Namespace(**values)


# ---------------------------------------------------------------- parsing


def test_recorded_spoke_dump_parses_field_by_field():
    iface = svc.parse_dump(dump("spoke.dump"))
    assert iface.public_key == "Lw1K8pfTvZPKauFpbgBKaOX5oGfF5BFwCzS/WbAiuXs="
    assert iface.listen_port == 47744
    assert iface.fwmark is None
    assert [p.public_key for p in iface.peers] == [HUB, HUB2, BARE, SILENT]
    hub, hub2, bare, silent = iface.peers
    assert hub == svc.Peer(HUB, "[2001:db8:5::1]:51820", ("10.88.0.0/24",), RECORDED_AT, 284, 308, 25)
    assert hub2 == svc.Peer(HUB2, "198.51.100.10:51821", ("10.99.0.0/24", "fd00:99::/64"),
                            RECORDED_AT, 188, 244, None)
    # A peer with nothing set: every "(none)" and "off" becomes "absent".
    assert bare == svc.Peer(BARE, None, (), 0, 0, 0, None)
    assert silent == svc.Peer(SILENT, "198.51.100.77:51820", ("10.77.0.0/24",), 0, 0, 148, 25)


def test_hub_side_dump_with_learnt_ipv6_endpoint():
    iface = svc.parse_dump(dump("hub.dump"))
    assert iface.listen_port == 51820
    (spoke,) = iface.peers
    assert spoke.public_key == "Lw1K8pfTvZPKauFpbgBKaOX5oGfF5BFwCzS/WbAiuXs="
    assert spoke.endpoint == "[2001:db8:5::2]:47744"
    assert spoke.allowed_ips == ("10.88.0.11/32",)
    assert spoke.persistent_keepalive is None


def test_fwmark_is_read_as_hexadecimal():
    assert svc.parse_dump(dump("hub-fwmark.dump")).fwmark == 0x1234


def test_interface_without_peers():
    iface = svc.parse_dump(dump("spoke.dump").splitlines()[0] + "\n")
    assert iface.peers == ()


@pytest.mark.parametrize("name", ["spoke.dump", "hub.dump", "hub-fwmark.dump", "spoke-stale-peer.dump"])
def test_no_secret_in_any_output(name):
    text = dump(name)
    secrets = secrets_of(text)
    assert secrets, "the fixture must hold a private key to prove anything"
    iface = svc.parse_dump(text)
    now = RECORDED_AT + 30
    doc = svc.status_document(options(), iface, now, 12 * 2 ** 30, None)
    outputs = [
        repr(iface),
        str(iface),
        json.dumps(doc),
        svc.metrics_text(options(), iface, now, 10 ** 9, doc),
        str(svc.health_problem(options(), iface, now)),
    ]
    for secret in secrets:
        for out in outputs:
            assert secret not in out
    # And the parsed objects hold no string that is a secret, whatever repr shows.
    held = [f for peer in iface.peers for f in peer] + list(iface[:3])
    assert not set(map(str, held)) & set(secrets)


def test_the_spoke_fixture_has_a_preshared_key():
    # Guards the test above: it must see a real preshared key, not only "(none)".
    assert len(secrets_of(dump("spoke.dump"))) == 2


@pytest.mark.parametrize("text, where", [
    ("", "printed nothing"),
    ("garbage\n", "line 1 has 1"),
    ("a\tb\tc\td\te\n", "line 1 has 5"),
])
def test_malformed_interface_line(text, where):
    with pytest.raises(svc.WgError, match=where):
        svc.parse_dump(text)


def _spoke_with(line_fields):
    first = dump("spoke.dump").splitlines()[0]
    return first + "\n" + "\t".join(line_fields) + "\n"


GOOD_PEER = [HUB, "(none)", "198.51.100.1:51820", "10.88.0.0/24", "0", "0", "0", "off"]


@pytest.mark.parametrize("index, value, where", [
    (0, "not-a-key", "peer public key"),
    (2, "198.51.100.1", "endpoint"),
    (2, "[2001:db8::1]", "endpoint"),
    (2, "example.com:51820", "endpoint"),
    (2, "198.51.100.1:0", "endpoint"),
    (3, "10.88.0.0/33", "allowed ips"),
    (4, "-5", "latest handshake"),
    (5, "lots", "transfer rx"),
    (6, "1e3", "transfer tx"),
    (7, "sometimes", "persistent keepalive"),
])
def test_malformed_peer_fields(index, value, where):
    fields = list(GOOD_PEER)
    fields[index] = value
    with pytest.raises(svc.WgError, match=where):
        svc.parse_dump(_spoke_with(fields))


def test_a_good_peer_line_parses():
    # The malformed cases above differ from this one in one field each.
    assert svc.parse_dump(_spoke_with(GOOD_PEER)).peers[0].endpoint == "198.51.100.1:51820"


def test_errors_never_quote_the_output():
    # A peer line carrying the private key where the public key belongs, and a
    # line cut short: the message names the place, not the content.
    private = secrets_of(dump("spoke.dump"))[0]
    bad_key = list(GOOD_PEER)
    bad_key[0] = private + "x"
    for text in (_spoke_with(bad_key), _spoke_with([private, "(none)"]),
                 private + "\t" + private + "\n"):
        with pytest.raises(svc.WgError) as caught:
            svc.parse_dump(text)
        assert private not in str(caught.value)


def test_ipv6_endpoint_with_brackets_accepted():
    fields = list(GOOD_PEER)
    fields[2] = "[2001:db8::1]:51820"
    assert svc.parse_dump(_spoke_with(fields)).peers[0].endpoint == "[2001:db8::1]:51820"


# ---------------------------------------------------------------- documents


def test_status_document_counts_and_ages():
    iface = svc.parse_dump(dump("spoke.dump"))
    doc = svc.status_document(options(), iface, RECORDED_AT + 42, int(17.46 * 2 ** 30), None)
    assert doc["node"] == "node-a"
    assert doc["overlay_ip"] == "10.88.0.11"
    assert doc["interface"] == "wg0"
    assert doc["peer_count"] == 4  # peers that never shook hands count too
    assert doc["peers_up"] == 2
    assert doc["max_last_handshake_sec"] is None  # two peers never shook hands
    assert [p["last_handshake_sec"] for p in doc["peers"]] == [42, 42, None, None]
    assert doc["peers"][2] == {"public_key": BARE, "endpoint": None, "allowed_ips": [],
                               "last_handshake_sec": None, "rx_bytes": 0, "tx_bytes": 0}
    assert doc["disk_free_gb"] == 17.5 and type(doc["disk_free_gb"]) is float
    assert "postgres" not in doc
    assert doc["time"] == "2026-11-26T08:15:32Z"


def test_max_handshake_is_the_oldest_when_all_peers_shook_hands():
    iface = svc.parse_dump(dump("spoke-stale-peer.dump"))
    doc = svc.status_document(options(), iface, RECORDED_AT + 10, 2 ** 30, {"role": "primary"})
    assert doc["peer_count"] == 2
    assert doc["peers_up"] == 1
    assert doc["max_last_handshake_sec"] == 410
    assert doc["postgres"] == {"role": "primary"}


def test_peers_up_limit_is_inclusive_and_configurable():
    iface = svc.parse_dump(dump("spoke-stale-peer.dump"))
    assert svc.status_document(options(), iface, RECORDED_AT + 180, 2 ** 30, None)["peers_up"] == 1
    assert svc.status_document(options(), iface, RECORDED_AT + 181, 2 ** 30, None)["peers_up"] == 0
    wide = options(handshake_recent=600)
    assert svc.status_document(wide, iface, RECORDED_AT + 181, 2 ** 30, None)["peers_up"] == 2


def test_handshake_in_the_future_counts_as_now():
    iface = svc.parse_dump(dump("hub.dump"))
    assert svc.status_document(options(), iface, RECORDED_AT - 3, 2 ** 30, None)["peers"][0]["last_handshake_sec"] == 0


@pytest.mark.parametrize("hub_key, fixture, age, problem", [
    (HUB, "spoke.dump", 10, None),
    (HUB, "spoke.dump", 181, "last handshake with the hub was 181 s ago (limit 180 s)"),
    (BARE, "spoke.dump", 10, "no handshake with the hub yet"),
    ("A" * 43 + "=", "spoke.dump", 10, "the hub (peer AAAA"),
    ("", "hub.dump", 10, None),
    ("", "hub.dump", 500, "last handshake with the hub was 500 s ago"),
    ("", "spoke.dump", 10, None),  # several peers, no hub named: any recent one
    ("", "spoke.dump", 200, "last handshake with any peer was 200 s ago"),
])
def test_health(hub_key, fixture, age, problem):
    iface = svc.parse_dump(dump(fixture))
    found = svc.health_problem(options(hub_public_key=hub_key, interface="wg-no-such0"), iface, RECORDED_AT + age)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def test_health_without_peers():
    iface = svc.parse_dump(dump("spoke.dump").splitlines()[0])
    opts = options(hub_public_key="", interface="wg-no-such0")
    assert svc.health_problem(opts, iface, RECORDED_AT) == "no peer is configured on wg-no-such0"


# ---------------------------------------------------------------- metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"(,|$)')


def parse_exposition(text):
    """A strict reader of the Prometheus text format: families, samples, labels."""
    assert text.endswith("\n")
    families, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            families.setdefault(name, {})["help"] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("gauge", "counter"), line
            assert name in families and "type" not in families[name], "TYPE after HELP, once: " + line
            families[name]["type"] = kind
        else:
            match = SAMPLE.match(line)
            assert match, "not a sample line: %r" % line
            name, labels_text, value = match.groups()
            assert name in families and "type" in families[name], "sample before its TYPE: " + line
            labels, pos = {}, 0
            while labels_text and pos < len(labels_text):
                label = LABEL.match(labels_text, pos)
                assert label, "bad labels in %r" % line
                value_text = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), label.group(2))
                labels[label.group(1)] = value_text
                pos = label.end()
            float(value)
            samples.append((name, labels, value))
    return families, samples


def test_metrics_are_valid_exposition_with_escaped_labels():
    iface = svc.parse_dump(dump("spoke.dump"))
    weird = 'node "a"\\b\nc'
    opts = options(node_name=weird)
    doc = svc.status_document(opts, iface, RECORDED_AT + 7, 2 * 2 ** 30, None)
    families, samples = parse_exposition(svc.metrics_text(opts, iface, RECORDED_AT + 7, 2 * 2 ** 30, doc))
    assert set(families) == {
        "dstack_vpn_status_info", "dstack_vpn_peers", "dstack_vpn_peers_up",
        "dstack_vpn_peer_last_handshake_age_seconds", "dstack_vpn_peer_receive_bytes_total",
        "dstack_vpn_peer_transmit_bytes_total", "dstack_vpn_disk_free_bytes"}
    assert all(f["help"] for f in families.values())
    by_name = {}
    for name, labels, value in samples:
        by_name.setdefault(name, []).append((labels, value))
    assert by_name["dstack_vpn_status_info"] == [({"node": weird, "interface": "wg0", "overlay_ip": "10.88.0.11"}, "1")]
    assert by_name["dstack_vpn_peers"] == [({"interface": "wg0"}, "4")]
    assert by_name["dstack_vpn_peers_up"] == [({"interface": "wg0"}, "2")]
    ages = {labels["public_key"]: value for labels, value in by_name["dstack_vpn_peer_last_handshake_age_seconds"]}
    assert ages == {HUB: "7", HUB2: "7", BARE: "+Inf", SILENT: "+Inf"}
    tx = {labels["public_key"]: value for labels, value in by_name["dstack_vpn_peer_transmit_bytes_total"]}
    assert tx == {HUB: "308", HUB2: "244", BARE: "0", SILENT: "148"}
    assert families["dstack_vpn_peer_receive_bytes_total"]["type"] == "counter"
    assert by_name["dstack_vpn_disk_free_bytes"] == [({"path": "/"}, str(2 * 2 ** 30))]


# ---------------------------------------------------------------- the node


def _fake_proc(root: Path, processes):
    """processes: (pid, comm, ppid, argv) tuples, written as /proc/<pid>/{stat,cmdline}."""
    for pid, comm, ppid, argv in processes:
        d = root / str(pid)
        d.mkdir()
        (d / "stat").write_text("%d (%s) S %d 1 1 0 -1 4194560\n" % (pid, comm, ppid))
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()  # non-numeric entries are ignored


def test_no_postgres(tmp_path):
    _fake_proc(tmp_path, [(1, "systemd", 0, ["/sbin/init"]), (50, "python3", 1, ["python3", "x"])])
    assert svc.postgres_role(str(tmp_path)) is None


@pytest.mark.parametrize("signal_file, role", [
    (None, "primary"), ("standby.signal", "replica"), ("recovery.signal", "replica")])
def test_postgres_role_from_signal_files(tmp_path, signal_file, role):
    data = tmp_path / "data"
    data.mkdir()
    if signal_file:
        (data / signal_file).touch()
    proc = tmp_path / "proc"
    proc.mkdir()
    _fake_proc(proc, [
        (1, "systemd", 0, ["/sbin/init"]),
        (700, "postgres", 1, ["/usr/lib/postgresql/15/bin/postgres", "-D", str(data), "-c", "x=y"]),
        # A child titled like a standby's: the signal files win where readable.
        (701, "postgres", 700, ["postgres: 15/main: walreceiver streaming 0/3000148"]),
    ])
    assert svc.postgres_role(str(proc)) == {"role": role}


@pytest.mark.parametrize("titles, role", [
    (["postgres: 15/main: checkpointer", "postgres: 15/main: walreceiver streaming 0/30001"], "replica"),
    (["postgres: startup recovering 000000010000000000000003"], "replica"),
    (["postgres: checkpointer", "postgres: walwriter", "postgres: autovacuum launcher"], "primary"),
    ([], None),
])
def test_postgres_role_from_titles_when_data_dir_is_unknown(tmp_path, titles, role):
    # The official image runs `postgres` with PGDATA in its environment: no -D.
    processes = [(1, "tini", 0, ["tini"]), (7, "postgres", 1, ["postgres"])]
    processes += [(100 + i, "postgres", 7, [t]) for i, t in enumerate(titles)]
    _fake_proc(tmp_path, processes)
    assert svc.postgres_role(str(tmp_path)) == {"role": role}


def test_postgres_relative_data_dir_is_not_trusted(tmp_path):
    (tmp_path / "main").mkdir()  # would be found relative to the test's cwd
    proc = tmp_path / "proc"
    proc.mkdir()
    _fake_proc(proc, [(7, "postgres", 1, ["postgres", "-D", "main"])])
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert svc.postgres_role(str(proc)) == {"role": None}
    finally:
        os.chdir(old)


def test_disk_free_is_what_an_unprivileged_writer_may_use():
    st = os.statvfs("/")
    got = svc.disk_free_bytes("/")
    assert abs(got - st.f_bavail * st.f_frsize) < 64 * 2 ** 20  # others write meanwhile
    assert svc.disk_free_bytes("/no/such/dir") is None


def test_disk_free_in_the_status_is_gib_to_a_tenth():
    iface = svc.parse_dump(dump("hub.dump"))
    assert svc.status_document(options(), iface, RECORDED_AT, int(3.14159 * 2 ** 30), None)["disk_free_gb"] == 3.1
    assert svc.status_document(options(), iface, RECORDED_AT, 0, None)["disk_free_gb"] == 0.0
    assert svc.status_document(options(), iface, RECORDED_AT, None, None)["disk_free_gb"] is None


def test_rfc3339_utc():
    assert svc.rfc3339(1795680000.9) == "2026-11-26T08:00:00Z"


# ---------------------------------------------------------------- options


def test_options_from_environment_and_command_line():
    env = {"DSTACK_VPN_STATUS_NODE_NAME": "node-b", "DSTACK_VPN_STATUS_LISTEN_PORT": "9000",
           "DSTACK_VPN_STATUS_HANDSHAKE_RECENT": "60", "DSTACK_VPN_STATUS_LOG_REQUESTS": "yes",
           "DSTACK_VPN_STATUS_LISTEN_ADDRESS": "::"}
    opts = svc.parse_args(["--listen-port", "9100"], env)
    assert (opts.node_name, opts.listen_port, opts.handshake_recent, opts.log_requests, opts.listen_address) == \
        ("node-b", 9100, 60, True, "::")
    defaults = svc.parse_args([], {})
    assert (defaults.interface, defaults.listen_address, defaults.listen_port, defaults.wg,
            defaults.handshake_recent, defaults.hub_public_key, defaults.log_requests) == \
        ("wg0", "0.0.0.0", 8000, "wg", 180, "", False)
    assert svc.parse_args(["--log-requests"], {}).log_requests is True


@pytest.mark.parametrize("argv, env", [
    (["--interface", "../etc"], {}),
    (["--interface", "a-name-far-too-long"], {}),
    (["--hub-public-key", "short"], {}),
    (["--listen-port", "70000"], {}),
    (["--listen-address", "localhost"], {}),
    (["--overlay-ip", "10.88.0.300"], {}),
    (["--request-timeout", "0"], {}),
    ([], {"DSTACK_VPN_STATUS_HANDSHAKE_RECENT": "soon"}),
    ([], {"DSTACK_VPN_STATUS_LOG_REQUESTS": "maybe"}),
])
def test_bad_options_are_refused(argv, env, capsys):
    with pytest.raises(SystemExit) as exited:
        svc.parse_args(argv, env)
    assert exited.value.code == 2


# ---------------------------------------------------------------- what the dump helper hands on


@pytest.mark.parametrize("name", ["spoke.dump", "hub.dump", "hub-fwmark.dump", "spoke-stale-peer.dump"])
def test_the_helpers_dump_is_the_same_reading_without_keys(name):
    text = dump(name)
    handed_on = svc.format_dump(svc.parse_dump(text))
    assert svc.parse_dump(handed_on) == svc.parse_dump(text)  # every field the page uses, unchanged
    for secret in secrets_of(text):
        assert secret not in handed_on
    lines = handed_on.splitlines()
    assert lines[0].split("\t")[0] == "(hidden)"
    assert all(line.split("\t")[1] == "(hidden)" for line in lines[1:])
    # everything else of wg's own line is there as wg wrote it
    for ours, theirs in zip(lines[1:], text.splitlines()[1:]):
        assert ours.split("\t")[2:] == theirs.split("\t")[2:]


def test_the_helpers_dump_keeps_the_fwmark_in_hexadecimal():
    handed_on = svc.format_dump(svc.parse_dump(dump("hub-fwmark.dump")))
    assert handed_on.splitlines()[0].split("\t")[3] == dump("hub-fwmark.dump").splitlines()[0].split("\t")[3]


def test_the_helpers_dump_of_an_interface_without_peers():
    iface = svc.Interface(None, 0, None, ())
    assert svc.format_dump(iface) == "(hidden)\t(none)\t0\toff\n"
    assert svc.parse_dump(svc.format_dump(iface)) == iface

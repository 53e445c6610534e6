"""The monitor (role `monitor`, the `monitor` setting): the setting and its refusals, Prometheus'
and Alertmanager's settings as their own tools check them (promtool check config, amtool
check-config), every alert rule firing and not firing (promtool test rules), the steps, the
firewall, and the receivers' credentials kept to the one file that needs them. The real thing
runs in tests/e2e/test_lab_monitor.py."""
import json
import os
import subprocess

import pytest
import yaml

import program
from components import config, monconfig, render
from components.nodes.remote import hub_node
from components.roles import firewall, monitor
from conftest import need_tool
from test_backup import BACKUP, KEYS
from test_postgres import CMD, PG, SPOKES, SSH_KEY, node, raw

WEBHOOK = {"name": "ops", "webhook": {"url": "http://198.51.100.9:9099/alerts"}}
EMAIL = {"name": "oncall", "email": {"to": "oncall@example.com", "from": "alerts@example.com",
                                     "smarthost": "smtp.example.com:587", "username": "alerts"}}
MAIL_PASSWORD = "m4il-pa55word-for-the-smarthost"
HOOK_TOKEN_URL = "https://hooks.example.com/services/T0KEN-in-the-url-0123456789"
SECRETS = {"oncall": {"password": MAIL_PASSWORD}, "tokened": {"url": HOOK_TOKEN_URL}}
MONITOR = {"node": "node-c", "hubMetrics": True,
           "receivers": [WEBHOOK, EMAIL, {"name": "tokened", "webhook": {}}]}


def settings(mon=None, secrets=None, pg=None):
    values = raw(pg)
    if pg is False:
        del values["postgres"]
    values["monitor"] = json.dumps(MONITOR if mon is None else mon)
    values["monitorSecrets"] = json.dumps(SECRETS if secrets is None else secrets)
    return values


def parse(mon=None, secrets=None, pg=None):
    return config.parse(settings(mon, secrets, pg))


# -- the setting --------------------------------------------------------------------------

def test_the_setting_parses_with_defaults():
    m = parse({"node": "node-c"}, {}).monitor
    assert m == monconfig.MonitorConfig("node-c")
    assert m.alerts == monconfig.Alerts(300, 10, 64, 48) and not m.hub_metrics and m.receivers == ()
    values = raw()
    assert config.parse(values).monitor is None


def test_receivers_take_their_credentials_from_the_secret():
    m = parse().monitor
    ops, oncall, tokened = m.receivers
    assert (ops.kind, ops.url) == ("webhook", WEBHOOK["webhook"]["url"])
    assert (oncall.kind, oncall.username, oncall.password, oncall.require_tls) == ("email", "alerts", MAIL_PASSWORD, True)
    assert (tokened.kind, tokened.url) == ("webhook", HOOK_TOKEN_URL)
    assert MAIL_PASSWORD not in repr(m) and HOOK_TOKEN_URL not in repr(m)


@pytest.mark.parametrize("mon, secrets, message", [
    ({}, {}, "monitor.node: required"),
    ({"node": "hub"}, {}, "monitor.node: the hub is a plain router"),
    ({"node": "node-x"}, {}, "monitor.node: 'node-x' is not a node"),
    ({"node": "node-d"}, {}, "monitor.node: 'node-d' is a dstack spoke"),
    ({"node": "node-c", "grafana": True}, {}, "monitor: unknown setting 'grafana'"),
    ({"node": "node-c", "hubMetrics": "yes"}, {}, "monitor.hubMetrics: expected true or false"),
    ({"node": "node-c", "scrapeInterval": 1}, {}, "monitor.scrapeInterval: 1 seconds; from 5 to 300"),
    ({"node": "node-c", "alerts": {"handshakeAge": 60}}, {}, "monitor.alerts.handshakeAge: 60 seconds"),
    ({"node": "node-c", "alerts": {"diskFree": 0}}, {}, "monitor.alerts.diskFree: 0 percent"),
    ({"node": "node-c", "alerts": {"uptime": 1}}, {}, "monitor.alerts: unknown setting 'uptime'"),
    ({"node": "node-c", "receivers": [{"name": "a"}]}, {}, r"monitor.receivers\[0\]: give exactly one of webhook or email"),
    ({"node": "node-c", "receivers": [{"name": "a", "webhook": {}}]}, {}, r"monitor.receivers\[0\].webhook.url: give the URL"),
    ({"node": "node-c", "receivers": [{"name": "a", "webhook": {"url": "ftp://x"}}]}, {},
     r"monitor.receivers\[0\].webhook.url: not an http\(s\) URL"),
    ({"node": "node-c", "receivers": [{"name": "a", "webhook": {"url": "http://x"}}]},
     {"a": {"url": "http://y"}}, "exactly one of them"),
    ({"node": "node-c", "receivers": [WEBHOOK, WEBHOOK]}, {}, r"monitor.receivers\[1\].name: 'ops' is used twice"),
    ({"node": "node-c", "receivers": [EMAIL]}, {}, "monitorSecrets.oncall.password: required"),
    ({"node": "node-c", "receivers": [{"name": "m", "email": dict(EMAIL["email"], smarthost="smtp")}]},
     {"m": {"password": "x"}}, "is not host:port"),
    ({"node": "node-c", "receivers": [{"name": "m", "email": dict(EMAIL["email"], to="nobody")}]},
     {"m": {"password": "x"}}, "'nobody' is not an email address"),
    ({"node": "node-c"}, {"ghost": {"url": "http://x"}}, "monitorSecrets.ghost: no receiver is called 'ghost'"),
])
def test_bad_settings_are_refused_naming_the_setting(mon, secrets, message):
    with pytest.raises(config.ConfigError, match=message):
        parse(mon, secrets)


def test_a_secret_url_is_never_repeated_in_an_error():
    bad = "https://hooks.example.com/T0KEN with space"
    with pytest.raises(config.ConfigError) as error:
        parse({"node": "node-c", "receivers": [{"name": "t", "webhook": {}}]}, {"t": {"url": bad}})
    assert "T0KEN" not in str(error.value) and "monitorSecrets.t.url" in str(error.value)


def test_secrets_without_a_monitor_are_refused():
    values = raw()
    values["monitorSecrets"] = json.dumps(SECRETS)
    with pytest.raises(config.ConfigError, match="monitorSecrets: set, but there is no monitor"):
        config.parse(values)


@pytest.mark.parametrize("mon, secrets", [({"node": "hub"}, {}), (MONITOR, {}),
                                          ({"node": "node-c", "receivers": [{"name": "a", "webhook": {}}]}, {})])
def test_bad_monitor_input_registers_nothing(mon, secrets):
    """Refused before any resource exists (the program stops at the config)."""
    stack = program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres=PG, monitor=mon,
                                 monitorSecrets=secrets)
    with pytest.raises(Exception, match="invalid stack config"):
        program.run(stack)


# -- what lands on the monitor, checked by the tools -----------------------------------------

PEERS = [{"name": s["name"], "public_key": f"{s['name']}+key/{i}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
         for i, s in enumerate(SPOKES)]


def _monitor_dir(tmp_path, cfg):
    for name, text in (("prometheus.yml", monitor.prometheus_config(cfg, PEERS)), ("rules.yml", monitor.rules(cfg)),
                       ("alertmanager.yml", monitor.alertmanager_config(cfg)),
                       ("postgres-ca.crt", "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")):
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("variant", ["postgres-backup-hub", "plain"])
def test_prometheus_and_alertmanager_settings_pass_their_checks(variant, tmp_path):
    promtool, amtool = need_tool("promtool"), need_tool("amtool")
    if variant == "plain":
        cfg = parse({"node": "node-c"}, {}, pg=False)
    else:
        cfg = config.parse({**settings(pg={**PG, "backup": BACKUP}), **KEYS})
    d = _monitor_dir(tmp_path, cfg)
    for tool, args in ((promtool, ["check", "config", str(d / "prometheus.yml")]),
                       (amtool, ["check-config", str(d / "alertmanager.yml")])):
        out = subprocess.run([tool, *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    prom = yaml.safe_load((d / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    rules = (d / "rules.yml").read_text()
    if variant == "plain":
        assert set(jobs) == {"status", "prometheus", "alertmanager"}
        assert "Postgres" not in rules and "Backup" not in rules and 'job="hub"' not in rules
    else:
        assert set(jobs) == {"status", "hub", "patroni", "postgres", "prometheus", "alertmanager"}
        assert jobs["patroni"]["scheme"] == "https" and jobs["patroni"]["tls_config"]["ca_file"] == "postgres-ca.crt"
        assert [c["targets"] for c in jobs["postgres"]["static_configs"]] == [
            ["10.88.0.11:9187"], ["10.88.0.12:9187"], ["10.88.0.15:9187"]]
        # the hub's view of each spoke is named after the spoke (its key, escaped, matched whole)
        relabels = jobs["hub"]["metric_relabel_configs"]
        assert relabels[1] == {"source_labels": ["public_key"], "regex": "node\\-b\\+key/1" + "A" * 31 + "=",
                               "target_label": "node", "replacement": "node-b"}
        assert jobs["hub"]["static_configs"] == [{"targets": ["10.88.0.1:8000"], "labels": {
            "node": "hub", "kind": "hub", "roles": "", "address": "10.88.0.1"}}]
    labels = {c["labels"]["node"]: c["labels"] for c in jobs["status"]["static_configs"]}
    assert set(labels) == {s["name"] for s in SPOKES}
    assert labels["node-c"]["roles"] == ("monitor" if variant == "plain" else "postgres-client,monitor")
    assert labels["node-d"]["kind"] == "dstack"


def test_every_receiver_gets_every_alert(tmp_path):
    am = yaml.safe_load(monitor.alertmanager_config(parse()))
    assert [r["receiver"] for r in am["route"]["routes"]] == ["ops", "oncall", "tokened"]
    assert all(r["continue"] for r in am["route"]["routes"])
    by_name = {r["name"]: r for r in am["receivers"]}
    assert by_name["ops"]["webhook_configs"][0]["url"] == WEBHOOK["webhook"]["url"]
    assert by_name["tokened"]["webhook_configs"][0]["url"] == HOOK_TOKEN_URL
    mail = by_name["oncall"]["email_configs"][0]
    assert (mail["auth_username"], mail["auth_password"], mail["smarthost"]) == ("alerts", MAIL_PASSWORD,
                                                                                 "smtp.example.com:587")
    none = yaml.safe_load(monitor.alertmanager_config(parse({"node": "node-c"}, {})))
    assert none["route"]["receiver"] == "page-only" and "routes" not in none["route"]


# -- the alert rules, each firing and not ----------------------------------------------------

def _series(rows):
    return [{"series": s, "values": v} for s, v in rows]


def _alert(name, at, *expected):
    return {"eval_time": at, "alertname": name, "exp_alerts": [
        {"exp_labels": labels, "exp_annotations": {"summary": summary}} for labels, summary in expected]}


def _spoke_down(node):
    return {"severity": "critical", "job": "status", "node": node}, f"{node} is down: nothing on it answers the monitor"


def _service_down(node):
    return ({"severity": "warning", "job": "status", "node": node},
            f"{node}: the status service does not answer; the node does")


RULE_TESTS = {
    "spoke and status service down": (_series([
        ('up{job="status",node="node-c"}', "0x20"),         # nothing answers: down
        ('up{job="status",node="node-b"}', "1x20"),         # fine
        ('up{job="status",node="node-a"}', "0x20"),         # its Patroni answers: the service alone
        ('up{job="patroni",node="node-a"}', "1x20"),
        ('up{job="status",node="node-e"}', "0x20"),         # the hub hears it: the service alone
        ('dstack_vpn_peer_receive_bytes_total{job="hub",node="node-e"}', "0+500x20"),
        ('up{job="status",node="node-d"}', "0x20"),         # the hub hears nothing new: down
        ('dstack_vpn_peer_receive_bytes_total{job="hub",node="node-d"}', "700x20"),
    ]), [
        _alert("DstackVpnSpokeDown", "45s"),                # not yet: for 1m
        _alert("DstackVpnSpokeDown", "2m", _spoke_down("node-c"), _spoke_down("node-d")),
        _alert("DstackVpnStatusServiceDown", "1m"),         # not yet: for 2m
        _alert("DstackVpnStatusServiceDown", "3m", _service_down("node-a"), _service_down("node-e")),
    ]),
    "handshake": (_series([
        ('dstack_vpn_peer_last_handshake_age_seconds{job="status",node="node-b",public_key="h"}', "400+15x20"),
        ('dstack_vpn_peer_last_handshake_age_seconds{job="hub",node="node-b",public_key="b"}', "401+15x20"),
        ('dstack_vpn_peer_last_handshake_age_seconds{job="status",node="node-a",public_key="h"}', "30x20"),
        # one view old, the other fresh: the tunnel lives (the newest handshake counts)
        ('dstack_vpn_peer_last_handshake_age_seconds{job="hub",node="node-e",public_key="e"}', "900x20"),
        ('dstack_vpn_peer_last_handshake_age_seconds{job="status",node="node-e",public_key="h"}', "20x20"),
        # a client (a laptop) away for hours: no alert, it comes and goes
        ('dstack_vpn_peer_last_handshake_age_seconds{job="hub",node="laptop",kind="client",public_key="l"}', "9000x20"),
    ]), [
        _alert("DstackVpnNoHandshake", "30s"),
        _alert("DstackVpnNoHandshake", "2m", ({"severity": "critical", "node": "node-b"},
                                              "node-b has had no WireGuard handshake with the hub for 8m 40s")),
    ]),
    "disk": (_series([
        ('dstack_vpn_disk_free_bytes{job="status",node="node-b",path="/"}', "5x40"),
        ('dstack_vpn_disk_size_bytes{job="status",node="node-b",path="/"}', "100x40"),
        ('dstack_vpn_disk_free_bytes{job="status",node="node-a",path="/"}', "50x40"),
        ('dstack_vpn_disk_size_bytes{job="status",node="node-a",path="/"}', "100x40"),
    ]), [
        _alert("DstackVpnDiskNearlyFull", "4m"),
        _alert("DstackVpnDiskNearlyFull", "6m", ({"severity": "warning", "job": "status", "node": "node-b",
                                                  "path": "/"}, "node-b: 5.0% of / is left")),
    ]),
    "no leader": (_series([
        ('patroni_primary{job="patroni",node="node-a"}', "1 1 1 0x20"),
        ('patroni_primary{job="patroni",node="node-b"}', "0x23"),
    ]), [
        _alert("DstackVpnPostgresNoLeader", "30s"),         # node-a leads
        _alert("DstackVpnPostgresNoLeader", "1m"),          # leaderless since 45 s: not yet
        _alert("DstackVpnPostgresNoLeader", "3m", ({"severity": "critical"},
                                                   "the PostgreSQL cluster has no leader: no member is primary")),
    ]),
    "replication lag": (_series([
        ('patroni_xlog_location{job="patroni",node="node-a"}', "209715200x20"),
        ('patroni_replica{job="patroni",node="node-a"}', "0x20"),
        ('patroni_xlog_location{job="patroni",node="node-b"}', "0x20"),
        ('patroni_xlog_replayed_location{job="patroni",node="node-b"}', "104857600x20"),   # 100 MB behind
        ('patroni_replica{job="patroni",node="node-b"}', "1x20"),
        ('patroni_xlog_location{job="patroni",node="node-e"}', "0x20"),
        ('patroni_xlog_replayed_location{job="patroni",node="node-e"}', "199229440x20"),   # 10 MB behind
        ('patroni_replica{job="patroni",node="node-e"}', "1x20"),
        ('patroni_xlog_replayed_location{job="patroni",node="node-a"}', "0x20"),           # the primary's
    ]), [
        _alert("DstackVpnReplicationLag", "1m"),
        _alert("DstackVpnReplicationLag", "3m", ({"severity": "warning", "job": "patroni", "node": "node-b"},
                                                 "node-b replays 100MiB behind the primary")),
    ]),
    "backup": (_series([
        ('dstack_vpn_backup_last_age_seconds{job="status",node="node-a"}', "180000+15x60"),
        ('dstack_vpn_backup_last_age_seconds{job="status",node="node-b"}', "180000+15x60"),
    ]), [
        _alert("DstackVpnBackupTooOld", "9m"),
        _alert("DstackVpnBackupTooOld", "11m", ({"severity": "warning"}, "the newest backup finished 2d 2h 11m 0s ago")),
    ]),
    "all well": (_series([
        ('up{job="status",node="node-b"}', "1x40"),
        ('dstack_vpn_peer_last_handshake_age_seconds{job="status",node="node-b",public_key="h"}', "40x40"),
        ('dstack_vpn_disk_free_bytes{job="status",node="node-b",path="/"}', "80x40"),
        ('dstack_vpn_disk_size_bytes{job="status",node="node-b",path="/"}', "100x40"),
        ('patroni_primary{job="patroni",node="node-a"}', "1x40"),
        ('patroni_replica{job="patroni",node="node-b"}', "1x40"),
        ('patroni_xlog_location{job="patroni",node="node-a"}', "1000x40"),
        ('patroni_xlog_replayed_location{job="patroni",node="node-b"}', "1000x40"),
        ('dstack_vpn_backup_last_age_seconds{job="status",node="node-a"}', "3600x40"),
    ]), [_alert(name, "10m") for name in (
        "DstackVpnSpokeDown", "DstackVpnStatusServiceDown", "DstackVpnNoHandshake", "DstackVpnDiskNearlyFull",
        "DstackVpnPostgresNoLeader", "DstackVpnReplicationLag", "DstackVpnBackupTooOld")]),
}


def _rules_cfg():
    return config.parse({**settings(pg={**PG, "backup": BACKUP}), **KEYS})


def test_every_rule_has_a_case_firing_and_one_not():
    rules = yaml.safe_load(monitor.rules(_rules_cfg()))["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules if "alert" in r}
    fired = {t["alertname"] for _, cases in RULE_TESTS.values() for t in cases if t["exp_alerts"]}
    quiet = {t["alertname"] for _, cases in RULE_TESTS.values() for t in cases if not t["exp_alerts"]}
    assert alerts == fired == quiet == {
        "DstackVpnSpokeDown", "DstackVpnStatusServiceDown", "DstackVpnNoHandshake", "DstackVpnDiskNearlyFull",
        "DstackVpnPostgresNoLeader", "DstackVpnReplicationLag", "DstackVpnBackupTooOld"}


@pytest.mark.parametrize("case", list(RULE_TESTS))
def test_the_alert_rules(case, tmp_path):
    promtool = need_tool("promtool")
    (tmp_path / "rules.yml").write_text(monitor.rules(_rules_cfg()))
    series, cases = RULE_TESTS[case]
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "15s",
             "tests": [{"interval": "15s", "input_series": series, "alert_rule_test": cases}]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    out = subprocess.run([promtool, "test", "rules", "tests.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_without_the_hubs_view_the_status_service_alone_is_told_by_the_nodes_other_parts(tmp_path):
    promtool = need_tool("promtool")
    cfg = parse({"node": "node-c"}, {})
    (tmp_path / "rules.yml").write_text(monitor.rules(cfg))
    series = _series([('up{job="status",node="node-a"}', "0x20"), ('up{job="patroni",node="node-a"}', "1x20"),
                      ('up{job="status",node="node-e"}', "0x20"),
                      ('dstack_vpn_peer_receive_bytes_total{job="hub",node="node-e"}', "0+500x20")])
    cases = [_alert("DstackVpnStatusServiceDown", "3m", _service_down("node-a")),
             _alert("DstackVpnSpokeDown", "3m", _spoke_down("node-e"))]
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "15s",
             "tests": [{"interval": "15s", "input_series": series, "alert_rule_test": cases}]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    out = subprocess.run([promtool, "test", "rules", "tests.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the program: steps, firewall, secrets ---------------------------------------------------

@pytest.fixture(scope="module")
def run():
    return program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres=PG, monitor=MONITOR,
                                            monitorSecrets=SECRETS))


def test_the_monitor_node_the_members_and_the_hub_get_their_steps(run):
    steps = {r.name: r for r in run.of_type(CMD)}
    assert sorted(n for n in steps if n.endswith(("-monitor", "-postgres-exporter"))) == [
        "node-a-postgres-exporter", "node-b-postgres-exporter", "node-c-monitor", "node-e-postgres-exporter"]
    assert "hub-status" in steps and "node-c-status" in steps
    mon = steps["node-c-monitor"]
    assert program.is_secret_marker(mon.inputs["stdin"]) and mon.inputs["logging"] == "none"
    by_urn = {r.urn: r for r in run.registrations}

    def waits_for(step, other):  # through the steps before it
        todo, seen = [steps[step]], set()
        while todo:
            r = todo.pop()
            if r.urn == steps[other].urn:
                return True
            todo += [by_urn[u] for u in r.dependencies if u in by_urn and u not in seen]
            seen.update(r.dependencies)
        return False

    assert waits_for("node-c-monitor", "node-c-firewall") and waits_for("node-c-monitor", "node-c-wireguard")
    for m in ("node-a", "node-b", "node-e"):
        assert steps[f"{m}-postgres"].urn in steps[f"{m}-postgres-exporter"].dependencies
    install = {n: json.dumps(program.unwrap(steps[f"{n}-install"].inputs["create"])) for n in ("node-a", "node-c", "hub")}
    assert "prometheus-alertmanager" in install["node-c"] and "prometheus-postgres-exporter" not in install["node-c"]
    assert "prometheus-postgres-exporter" in install["node-a"] and "prometheus-alertmanager" not in install["node-a"]
    assert "prometheus" not in install["hub"]
    # the packages' own services never start (ours run instead)
    assert "/etc/systemd/system/prometheus.service.d/dstack-vpn.conf" in install["node-c"]


def test_without_hub_metrics_the_hub_serves_nothing():
    run = program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres=PG,
                                           monitor={"node": "node-c"}))
    names = {r.name for r in run.of_type(CMD)}
    assert "hub-status" not in names and "node-c-monitor" in names


def test_no_receiver_credential_in_any_plain_input_output_or_command_text(run):
    stdin = program.unwrap(run.named("node-c-monitor", CMD).inputs["stdin"])
    files = json.loads(stdin.rsplit("\n", 2)[0])
    secrets = {"mail password": MAIL_PASSWORD, "webhook token url": HOOK_TOKEN_URL}
    # in alertmanager.yml, and in no other file of the bundle
    assert all(s in files["alertmanager.yml"] for s in secrets.values())
    assert [n for n, text in files.items() if n != "alertmanager.yml" and any(s in text for s in secrets.values())] == []
    assert program.secret_leaks(run, secrets) == []


def test_the_firewalls_let_the_monitor_alone_in(tmp_path):
    from test_render import nft_check
    cfg = parse()
    member = firewall.values(node(cfg, "node-a"))
    limits = {(limit.port): limit.addresses for limit in member["overlay_limits"]}
    assert limits[9187] == ("10.88.0.13",)
    assert limits[8008] == ("10.88.0.11", "10.88.0.12", "10.88.0.15", "10.88.0.13")
    mon = {limit.port: limit.addresses for limit in firewall.values(node(cfg, "node-c"))["overlay_limits"]}
    assert mon[9090] == ("10.88.0.13",)
    nft_check(tmp_path, render.render("nftables/spoke.nft", **member))
    hub = render.render("nftables/hub.nft", **firewall.values(hub_node(cfg)))
    nft_check(tmp_path, hub)
    assert 'iifname "wg0" ip saddr 10.88.0.13 tcp dport 8000 accept' in hub
    plain = render.render("nftables/hub.nft", **firewall.values(hub_node(parse({"node": "node-c"}, {}))))
    assert "tcp dport 8000" not in plain
    # no opening on the hub's underlay for its status service
    assert all(o.port != 8000 for o in hub_node(cfg).openings)


def _scripts():
    cfg = parse()
    mon = node(cfg, "node-c")
    for step in ("monitor", "monitor-undo"):
        yield step, render.script(step, f"scripts/{step}.sh", **monitor.monitor_values(mon))
    for step in ("postgres-exporter", "postgres-exporter-undo"):
        yield step, render.script(step, f"scripts/{step}.sh", **monitor.exporter_values(node(cfg, "node-a")))


def test_the_scripts_pass_shellcheck(tmp_path):
    shellcheck = need_tool("shellcheck")
    for name, text in _scripts():
        path = tmp_path / name
        path.write_text(text)
        out = subprocess.run([shellcheck, "-s", "bash", "-S", "warning", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, name + "\n" + out.stdout


@pytest.mark.parametrize("unit", ["dstack-vpn-prometheus.service", "dstack-vpn-alertmanager.service",
                                  "dstack-vpn-postgres-exporter.service"])
def test_the_units_verify(unit, tmp_path):
    need_tool("systemd-analyze")
    cfg = parse()
    values = (monitor.exporter_values(node(cfg, "node-a")) if "exporter" in unit
              else monitor.monitor_values(node(cfg, "node-c")))
    path = tmp_path / unit
    path.write_text(render.render(f"systemd/{unit}", **values))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [line for line in out.stderr.splitlines() if line.strip() and "is not executable" not in line
                and "/usr/bin/prometheus" not in line]
    assert problems == [], out.stderr

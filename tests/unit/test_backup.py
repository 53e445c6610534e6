"""Backups (role `backup`, postgres.backup and postgres.restore): the setting and its refusals,
the secrets, what lands on the members (checked by shellcheck, systemd-analyze, patroni
--validate-config), the Spaces bucket the program makes, and the status page's reading. The real
thing runs in tests/e2e/test_lab_backup.py."""
import json
import os
import subprocess
import time

import pytest
import yaml

import program
from components import pgconfig, render
from components.roles import backup, postgres
from conftest import need_tool
from status import dstack_vpn_status as svc
from test_postgres import CMD, PG, SPOKES, SSH_KEY, node, parse, raw

S3 = {"type": "s3", "endpoint": "https://s3.example.net:8443", "bucket": "pg-backups", "region": "eu-west-1"}
KEYS = {"backupAccessKeyId": "AKIAEXAMPLE12345", "backupSecretAccessKey": "s3cr3t-access-key-0123456789abcdef"}
BACKUP = {"repository": S3, "retention": {"full": 3, "diff": 5}}


def parse_backup(backup_setting=None, keys=None, **pg):
    from components import config
    values = raw({**PG, "backup": BACKUP if backup_setting is None else backup_setting, **pg})
    values.update(KEYS if keys is None else keys)
    return config.parse(values)


# -- the setting --------------------------------------------------------------------------

def test_the_setting_parses_with_defaults():
    b = parse_backup().postgres.backup
    assert b.repository == pgconfig.Repository("s3", "pg-backups", "eu-west-1", "s3.example.net:8443", "/dstack-vpn",
                                               "host", None, KEYS["backupAccessKeyId"], KEYS["backupSecretAccessKey"])
    assert (b.retention_full, b.retention_diff, b.archive_timeout) == (3, 5, 60)
    assert b.schedule_full == "Sun *-*-* 03:00:00" and b.schedule_diff == "Mon..Sat *-*-* 03:00:00"
    assert KEYS["backupSecretAccessKey"] not in repr(b)
    assert parse().postgres.backup is None and parse().postgres.restore is None


@pytest.mark.parametrize("setting, keys, message", [
    ({"repository": S3, "retention": {"full": 0}}, KEYS, r"retention.full: 0 full backups; from 1 .*zero would keep"),
    ({"repository": S3, "retention": {"diff": 0}}, KEYS, r"retention.diff: 0"),
    ({"repository": S3, "retention": {"full": "2"}}, KEYS, r"retention.full: expected a whole number"),
    ({"repository": dict(S3, type="ftp")}, KEYS, r"repository.type: 'ftp' is not a repository type"),
    ({"repository": dict(S3, type=None)}, KEYS, r"repository.type: None is not a repository type"),
    ({"repository": S3}, {}, r"backupAccessKeyId: required for an `s3` repository"),
    ({"repository": S3}, {"backupAccessKeyId": "AKIAEXAMPLE12345"}, r"backupSecretAccessKey: required"),
    ({"repository": S3}, dict(KEYS, backupSecretAccessKey="a b"), r"backupSecretAccessKey: not an access key"),
    ({"repository": dict(S3, endpoint="http://s3.example.net")}, KEYS, r"endpoint: .*over TLS only"),
    ({"repository": dict(S3, endpoint="https://s3.example.net/x y")}, KEYS, r"is not https://HOST\[:PORT\]"),
    ({"repository": {k: v for k, v in S3.items() if k != "bucket"}}, KEYS, r"repository.bucket: required"),
    ({"repository": dict(S3, bucket="No_Such")}, KEYS, r"repository.bucket: 'No_Such' is not a bucket name"),
    ({"repository": dict(S3, uriStyle="virtual")}, KEYS, r"uriStyle: 'virtual'"),
    ({"repository": dict(S3, caCertificate="-----BEGIN PRIVATE KEY-----")}, KEYS, r"caCertificate: not a PEM"),
    ({"repository": dict(S3, path="relative")}, KEYS, r"repository.path: 'relative'"),
    ({"repository": dict(S3, acl="public")}, KEYS, r"repository: unknown setting 'acl'"),
    ({"repository": {"type": "spaces", "region": "mars1"}}, {}, r"region: 'mars1' is not a Spaces region"),
    ({"repository": {"type": "spaces", "region": "fra1"}}, KEYS, r"backupAccessKeyId: a `spaces` repository's key is made"),
    ({"repository": {"type": "spaces", "region": "fra1", "endpoint": "https://x"}}, {}, r"unknown setting 'endpoint'"),
    ({}, KEYS, r"postgres.backup.repository: required"),
    ({"repository": S3, "schedule": {"full": "Sun; rm -rf /"}}, KEYS, r"schedule.full: .* is not a systemd calendar"),
    ({"repository": S3, "archiveTimeout": 0}, KEYS, r"archiveTimeout: 0 seconds"),
    ({"repository": S3, "every": 1}, KEYS, r"postgres.backup: unknown setting 'every'"),
])
def test_bad_backup_settings_are_refused_naming_the_setting(setting, keys, message):
    from components import config
    with pytest.raises(config.ConfigError, match=message):
        parse_backup(setting, keys)


@pytest.mark.parametrize("restore, message", [
    ({"generation": 0, "target": "latest"}, r"restore.generation: 0"),
    ({"generation": "1", "target": "latest"}, r"restore.generation: expected a number"),
    ({"generation": 1, "target": "yesterday"}, r"restore.target: 'yesterday'"),
    ({"generation": 1, "target": "2026-12-03 12:00:00"}, r"restore.target: .*with its zone"),
    ({"generation": 1}, r"restore.target: expected"),
    ({"generation": 1, "target": "latest", "from": "x"}, r"unknown setting 'from'"),
])
def test_bad_restore_settings_are_refused(restore, message):
    from components import config
    with pytest.raises(config.ConfigError, match=message):
        parse_backup(restore=restore)


def test_a_restore_needs_backups_and_keys_need_a_repository():
    from components import config
    with pytest.raises(config.ConfigError, match=r"postgres.restore: there is nothing to restore from"):
        parse(restore={"generation": 1, "target": "latest"})
    values = raw()
    values.update(KEYS)
    with pytest.raises(config.ConfigError, match=r"backupAccessKeyId: set, but postgres.backup is not"):
        config.parse(values)


@pytest.mark.parametrize("target", ["2026-12-03 12:00:00+00", "2026-12-03T12:00:00Z", "2026-12-03 12:00:00.123456+01:00",
                                    "latest"])
def test_restore_targets_postgresql_reads(target):
    assert parse_backup(restore={"generation": 2, "target": target}).postgres.restore == pgconfig.Restore(2, target)


@pytest.mark.parametrize("setting, keys", [
    ({"repository": dict(S3, type="ftp")}, KEYS), ({"repository": S3, "retention": {"full": 0}}, KEYS),
    ({"repository": S3}, {}),
])
def test_bad_backup_input_registers_nothing(setting, keys):
    """Refused before any resource exists (the program stops at the config)."""
    settings = program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres={**PG, "backup": setting}, **keys)
    with pytest.raises(Exception, match="invalid stack config"):
        program.run(settings)


# -- the program ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run():
    return program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres={**PG, "backup": BACKUP},
                                            **KEYS))


def test_every_member_gets_pgbackrest_and_the_last_one_the_first_backup(run):
    steps = {r.name: r for r in run.of_type(CMD)}
    assert sorted(n for n in steps if n.endswith(("-pgbackrest", "-backup"))) == [
        "node-a-pgbackrest", "node-b-pgbackrest", "node-e-backup", "node-e-pgbackrest"]
    # Patroni starts once pgBackRest's settings (archive_command, a restore's script) are there;
    # the first backup once the cluster runs
    for m in ("node-a", "node-b", "node-e"):
        assert steps[f"{m}-pgbackrest"].urn in steps[f"{m}-postgres"].dependencies
        assert program.is_secret_marker(steps[f"{m}-pgbackrest"].inputs["stdin"])
        assert steps[f"{m}-pgbackrest"].inputs["logging"] == "none"
    assert steps["node-e-postgres"].urn in steps["node-e-backup"].dependencies
    assert "pgbackrest" in json.dumps(program.unwrap(steps["node-a-install"].inputs["create"]))
    assert "pgbackrest" not in json.dumps(program.unwrap(steps["node-c-install"].inputs["create"]))
    assert "postgres-backup-cipher" in {r.name for r in run.of_type(program.DYNAMIC)}
    # pgBackRest's TLS: a certificate whose common name is the member's address (it checks no
    # IP address entry), from the cluster's CA
    cert = program.unwrap(run.named("node-b-pgbackrest-cert", program.DYNAMIC).inputs)
    assert cert["kind"] == "tls-cert" and cert["comment"] == "10.88.0.12"
    assert cert["names"] == ["10.88.0.12", "dns:10.88.0.12"]


def test_no_backup_secret_in_any_plain_input_output_or_command_text(run):
    stdin = program.unwrap(run.named("node-b-pgbackrest", CMD).inputs["stdin"])
    conf = json.loads(stdin.rsplit("\n", 2)[0])["pgbackrest.conf"]
    cipher = conf.split("repo1-cipher-pass=")[1].split("\n")[0]
    assert cipher in run.made_secrets  # the passphrase is a key the program made
    secrets = {"cipher": cipher, "secret access key": KEYS["backupSecretAccessKey"]}
    assert program.secret_leaks(run, secrets) == []
    # the scan can see them: both are in the secret stdin of a member's pgbackrest step
    assert f"repo1-s3-key-secret={KEYS['backupSecretAccessKey']}" in conf
    assert "repo1-cipher-pass=" in conf and "repo1-cipher-type=aes-256-cbc" in conf


def test_a_spaces_repository_is_a_bucket_and_two_keys_the_program_makes():
    spaces = {"repository": {"type": "spaces", "region": "fra1"}}
    run = program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres={**PG, "backup": spaces}))
    keys = {r.name: program.unwrap(r.inputs) for r in run.of_type("digitalocean:index/spacesKey:SpacesKey")}
    assert keys["backup-spaces-admin"]["grants"] == [{"bucket": "", "permission": "fullaccess"}]
    bucket = run.named("backup-bucket", "digitalocean:index/spacesBucket:SpacesBucket")
    inputs = program.unwrap(bucket.inputs)
    assert inputs["name"] == "dstack-vpn-test-backups" and inputs["region"] == "fra1" and inputs["acl"] == "private"
    assert keys["backup-spaces-members"]["grants"] == [{"bucket": "dstack-vpn-test-backups", "permission": "readwrite"}]
    provider = run.named("backup-spaces", "pulumi:providers:digitalocean")
    assert provider.urn.split("::")[-1] == "backup-spaces" and bucket.inputs  # the bucket is made with that key
    stdin = json.loads(program.unwrap(run.named("node-a-pgbackrest", CMD).inputs["stdin"]).rsplit("\n", 2)[0])
    conf = stdin["pgbackrest.conf"]
    assert "repo1-s3-endpoint=fra1.digitaloceanspaces.com" in conf and "repo1-s3-bucket=dstack-vpn-test-backups" in conf
    assert "repo1-s3-key=DO00MOCK" in conf and "repo1-s3-key-secret=mock-spaces-secret-" in conf
    secret = conf.split("repo1-s3-key-secret=")[1].split("\n")[0]
    assert not [r.name for r in run.registrations for t in program.plain_strings(r.inputs) if secret in t]


def test_pgbackrests_port_is_for_the_members_alone():
    from components import topology
    cfg = parse_backup()
    limits = backup.ROLE.overlay_limits(node(cfg, "node-a"))
    assert limits == [topology.OverlayLimit("tcp", 8432, ("10.88.0.11", "10.88.0.12", "10.88.0.15"))]
    assert backup.ROLE.overlay_limits(node(cfg, "node-c")) == []  # a client
    assert backup.ROLE.overlay_limits(node(parse(), "node-a")) == []  # no backups


# -- what lands on the members ----------------------------------------------------------------

CONF_VALUES = ("AKIAEXAMPLE12345", KEYS["backupSecretAccessKey"], "cipher-pass", "pg-backups")


def test_pgbackrest_conf_reaches_the_others_through_their_tls_servers():
    cfg = parse_backup()
    conf = backup.pgbackrest_conf(node(cfg, "node-b"), *CONF_VALUES)
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert "repo1-s3-endpoint=s3.example.net" in lines and "repo1-storage-port=8443" in lines
    assert "repo1-retention-full=3" in lines and "repo1-retention-diff=5" in lines and "backup-standby=y" in lines
    assert "tls-server-address=10.88.0.12" in lines and "pg1-path=/var/lib/postgresql/15/dstack-vpn" in lines
    assert [x for x in lines if x.startswith("pg2-host=") or x.startswith("pg3-host=")] == [
        "pg2-host=10.88.0.11", "pg3-host=10.88.0.15"]
    assert [x for x in lines if x.startswith("tls-server-auth=")] == [
        f"tls-server-auth={a}=dstack-vpn" for a in ("10.88.0.11", "10.88.0.12", "10.88.0.15")]
    assert "tls-server-cert-file=/etc/dstack-vpn-postgres/pgbackrest.crt" in lines
    # a single member backs itself up
    single = backup.pgbackrest_conf(node(parse_backup(members=["node-b"]), "node-b"), *CONF_VALUES)
    assert "backup-standby" not in single and "pg2-host" not in single


def test_pgbackrest_reads_the_settings(tmp_path):
    """pgBackRest itself parses the rendered file: every option is one it knows, in its section."""
    pgbackrest = need_tool("pgbackrest")
    conf = tmp_path / "pgbackrest.conf"
    conf.write_text(backup.pgbackrest_conf(node(parse_backup(), "node-b"), *CONF_VALUES))
    def info(path):
        # no S3 endpoint answers here (a closed port instead of the example's): the repository's error
        return subprocess.run([pgbackrest, f"--config={path}", "--stanza=dstack-vpn", "--log-level-console=warn",
                               f"--lock-path={tmp_path}", f"--log-path={tmp_path}", "--repo1-s3-endpoint=127.0.0.1",
                               "--repo1-storage-port=1", "--io-timeout=1", "info", "--output=json"],
                              capture_output=True, text=True, timeout=120)
    out = info(conf)
    doc = json.loads(out.stdout)[0]
    assert doc["cipher"] == "aes-256-cbc" and doc["repo"][0]["status"]["code"] == 99, doc
    assert "invalid option" not in out.stderr and "not valid" not in out.stderr, out.stderr
    # ... where a misspelt option would be named
    (tmp_path / "bad.conf").write_text(conf.read_text() + "repo1-retention-ful=2\n")
    assert "contains invalid option 'repo1-retention-ful'" in info(tmp_path / "bad.conf").stderr


def test_patroni_archives_and_a_restore_bootstraps_from_the_repository(tmp_path):
    cfg = parse_backup(restore={"generation": 2, "target": "2026-12-03 12:00:00+00"})
    text = postgres.patroni_config(cfg, "node-a", "10.88.0.11", {"postgres": "p", "replicator": "r"})
    doc = yaml.safe_load(text)
    assert doc["scope"] == "dstack-vpn-r2" and doc["postgresql"]["data_dir"] == "/var/lib/postgresql/15/dstack-vpn-r2"
    params = doc["postgresql"]["parameters"]
    assert params["archive_mode"] == "on" and params["archive_timeout"] == 60
    assert params["archive_command"] == ('pgbackrest --config=/etc/dstack-vpn-postgres/pgbackrest.conf '
                                         '--stanza=dstack-vpn archive-push "%p"')
    # replicas stream (Patroni keeps a slot for each): none waits on the repository to start
    assert "recovery_conf" not in doc["postgresql"]
    assert "archive-get %f" in doc["bootstrap"]["pgbackrest"]["recovery_conf"]["restore_command"]
    boot = doc["bootstrap"]
    assert boot["method"] == "pgbackrest" and boot["pgbackrest"]["command"] == "/usr/local/lib/dstack-vpn/restore.sh"
    assert boot["pgbackrest"]["recovery_conf"]["recovery_target_time"] == "2026-12-03 12:00:00+00"
    assert boot["pgbackrest"]["recovery_conf"]["recovery_target_action"] == "promote"
    latest = yaml.safe_load(postgres.patroni_config(parse_backup(restore={"generation": 1, "target": "latest"}),
                                                    "node-a", "10.88.0.11", {"postgres": "p", "replicator": "r"}))
    assert "recovery_target_time" not in latest["bootstrap"]["pgbackrest"]["recovery_conf"]
    # without backups, nothing of it (a cluster deployed before backups sees the same file)
    plain = yaml.safe_load(postgres.patroni_config(parse(), "node-a", "10.88.0.11", {"postgres": "p", "replicator": "r"}))
    assert "archive_mode" not in plain["postgresql"]["parameters"] and "method" not in plain["bootstrap"]
    assert "recovery_conf" not in plain["postgresql"] and plain["scope"] == "dstack-vpn"
    patroni = need_tool("patroni")
    for name in ("member.crt", "member.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    text = text.replace(postgres.CONF_DIR, str(tmp_path)).replace(postgres.data_dir(cfg.postgres), str(tmp_path / "d"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for binary in ("pg_ctl", "initdb", "pg_controldata", "pg_basebackup", "postgres", "pg_isready", "pg_rewind"):
        (bin_dir / binary).write_text("#!/bin/sh\n")
        (bin_dir / binary).chmod(0o755)
    path = tmp_path / "patroni.yml"
    path.write_text(text.replace("/usr/lib/postgresql/15/bin", str(bin_dir)))
    out = subprocess.run([patroni, "--validate-config", str(path)], capture_output=True, text=True, timeout=60)
    # as in test_postgres: the ports "in use" (no such address here) and two settings with defaults
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip() and not (
        "is already in use" in line or line.strip() in ("bootstrap.pg_hba  is not defined.",
                                                         "postgresql.authentication.rewind  is not defined."))]
    assert problems == [], out.stdout + out.stderr


def _scripts(cfg, name):
    n = node(cfg, name)
    values = backup.step_values(n)
    for step in ("pgbackrest", "backup"):
        for undo in ("", "-undo"):
            yield f"{step}{undo}", render.script(step, f"scripts/{step}{undo}.sh", **values)
    for lib in ("restore.sh", "backup-run.sh", "backup-status.sh"):
        yield lib, render.render(f"backup/{lib}", **values)


@pytest.mark.parametrize("restore", [None, {"generation": 1, "target": "latest"},
                                     {"generation": 3, "target": "2026-12-03 12:00:00+00"}])
def test_the_scripts_pass_shellcheck(restore, tmp_path):
    shellcheck = need_tool("shellcheck")
    cfg = parse_backup(**({"restore": restore} if restore else {}))
    for name, text in _scripts(cfg, "node-e"):
        path = tmp_path / name.replace(".sh", "")
        path.write_text(text)
        shell = "sh" if name.endswith(".sh") else "bash"
        out = subprocess.run([shellcheck, "-s", shell, "-S", "warning", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, name + "\n" + out.stdout


def test_a_restore_waits_for_the_old_cluster_and_leaves_recovery_to_patroni():
    scripts = dict(_scripts(parse_backup(restore={"generation": 3, "target": "2026-12-03 12:00:00+00"}), "node-a"))
    restore = scripts["restore.sh"]
    assert "grep -v '^/dstack-vpn/dstack-vpn-r3/'" in restore
    assert "--type=time --target='2026-12-03 12:00:00+00'" in restore
    assert "sed -i -e '/^restore_command/d' -e '/^recovery_target/d'" in restore
    assert "--type=default restore" in dict(_scripts(parse_backup(restore={"generation": 1, "target": "latest"}),
                                                     "node-a"))["restore.sh"]


@pytest.mark.parametrize("unit", ["dstack-vpn-pgbackrest.service", "dstack-vpn-backup@.service",
                                  "dstack-vpn-backup-full.timer", "dstack-vpn-backup-diff.timer",
                                  "dstack-vpn-backup-status.service", "dstack-vpn-backup-status.timer"])
def test_the_units_verify(unit, tmp_path):
    need_tool("systemd-analyze")
    values = backup.step_values(node(parse_backup(), "node-b"))
    path = tmp_path / unit
    path.write_text(render.render(f"systemd/{unit}", **values))
    if unit.endswith(".timer"):  # a timer needs its unit beside it
        target = "dstack-vpn-backup-status.service" if "status" in unit else "dstack-vpn-backup@.service"
        (tmp_path / target).write_text(render.render(f"systemd/{target}", **values))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [line for line in out.stderr.splitlines() if line.strip() and "is not executable" not in line
                and "/usr/bin/pgbackrest" not in line and "/usr/local/lib/dstack-vpn" not in line]
    assert problems == [], out.stderr


# -- the status page -----------------------------------------------------------------------------

def _status_script(tmp_path, info: str, lsn: str):
    """backup-status.sh with a pgbackrest and a psql that answer as given."""
    values = backup.step_values(node(parse_backup(), "node-b"))
    text = render.render("backup/backup-status.sh", **dict(values, status_file=str(tmp_path / "status.json")))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "pgbackrest").write_text(f"#!/bin/sh\ncat <<'EOF'\n{info}\nEOF\n")
    (bin_dir / "psql").write_text(f"#!/bin/sh\necho '{lsn}'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "s.sh").write_text(text)
    out = subprocess.run(["sh", str(tmp_path / "s.sh")], capture_output=True, text=True,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads((tmp_path / "status.json").read_text())


INFO = json.dumps([{"name": "dstack-vpn", "status": {"code": 0, "message": "ok"}, "cipher": "aes-256-cbc",
                    "archive": [{"id": "15-1", "min": "000000010000000000000001", "max": "000000010000000000000005"}],
                    "backup": [{"type": "full", "label": "F1", "timestamp": {"start": 100, "stop": 1000},
                                "info": {"size": 30000000, "repository": {"delta": 4000000}}},
                               {"type": "diff", "label": "D1", "timestamp": {"start": 1500, "stop": 2000},
                                "info": {"size": 31000000, "repository": {"delta": 100000}}}]}])


def test_the_status_timer_reads_the_newest_backup_and_the_archive_lag(tmp_path):
    # the newest archived segment (5) ends at 0/6000000; this member's WAL is at 0/6000100
    got = _status_script(tmp_path, INFO, "0/6000100")
    assert got["last_backup"] == {"type": "diff", "label": "D1", "stop": 2000, "size": 31000000, "repo_size": 100000}
    assert got["archive_max_wal"] == "000000010000000000000005" and got["archive_lag_bytes"] == 0x100
    assert got["error"] is None and abs(got["checked"] - time.time()) < 30
    behind = _status_script(tmp_path, INFO, "0/5FFFFFF")
    assert behind["archive_lag_bytes"] == 0
    broken = _status_script(tmp_path, "ERROR: [039]: HTTP request failed", "")
    assert broken["last_backup"] is None and "HTTP request failed" in broken["error"]


def test_the_status_page_says_how_old_the_backup_is(tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"checked": 990, "error": None, "archive_max_wal": "000000010000000000000005",
                                "archive_lag_bytes": 256, "last_backup": {"type": "diff", "stop": 400}}))
    doc = svc.backup_status(str(path), 1000.0)
    assert doc == {"last_backup_type": "diff", "last_backup_age_sec": 600, "archive_lag_bytes": 256,
                   "archive_max_wal": "000000010000000000000005", "checked_age_sec": 10, "error": None}
    assert svc.backup_status(str(tmp_path / "none"), 1000.0)["error"] == "no reading yet"
    path.write_text("{not json")
    assert svc.backup_status(str(path), 1000.0)["error"] == "unreadable reading"


def test_a_members_status_service_reads_the_backup_file():
    from components.roles import status
    member = status.values(node(parse_backup(), "node-b"))
    assert member["backup_status"] == "/var/lib/dstack-vpn-backup/status.json"
    assert status.values(node(parse_backup(), "node-c"))["backup_status"] == ""
    assert status.values(node(parse(), "node-b"))["backup_status"] == ""


def test_pgbackrests_tls_takes_the_members_certificates(tmp_path):
    """pgBackRest's TLS server and client, with certificates made as the program makes them (on
    loopback): the client gets past the certificate checks both ways (it fails on the missing
    database after), and with a certificate that names the address as an IP address only, it does
    not (what pgBackRest 2.45 does, and why cert_names has a DNS name)."""
    import socket

    from components import keys
    pgbackrest = need_tool("pgbackrest")
    ca = keys.tls_ca("test CA")
    (tmp_path / "ca.crt").write_text(ca["public_key"])
    for name, names in (("good", backup.cert_names("127.0.0.1")), ("ip-only", ["127.0.0.1"])):
        cert = keys.tls_cert("127.0.0.1", names, ca["private_key"], ca["public_key"])
        (tmp_path / f"{name}.crt").write_text(cert["public_key"])
        (tmp_path / f"{name}.key").write_text(cert["private_key"])
        (tmp_path / f"{name}.key").chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def check(name):
        return subprocess.run([
            pgbackrest, "--config=/dev/null", f"--log-path={tmp_path}", "--log-level-console=warn", "--stanza=x",
            "--pg1-host=127.0.0.1", "--pg1-host-type=tls", f"--pg1-host-port={port}",
            f"--pg1-host-cert-file={tmp_path}/{name}.crt", f"--pg1-host-key-file={tmp_path}/{name}.key",
            f"--pg1-host-ca-file={tmp_path}/ca.crt", f"--pg1-path={tmp_path}/data", f"--repo1-path={tmp_path}/repo",
            "check"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60).stdout

    results = {}
    for name in ("good", "ip-only"):
        server = subprocess.Popen([
            pgbackrest, "--config=/dev/null", f"--log-path={tmp_path}", "--tls-server-address=127.0.0.1",
            f"--tls-server-port={port}", f"--tls-server-cert-file={tmp_path}/{name}.crt",
            f"--tls-server-key-file={tmp_path}/{name}.key", f"--tls-server-ca-file={tmp_path}/ca.crt",
            "--tls-server-auth=127.0.0.1=x", "server"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            results[name] = check(name)
        finally:
            server.terminate()
            server.wait(timeout=10)
    assert "DbConnectError" in results["good"] and "CryptoError" not in results["good"], results["good"]
    assert "unable to find hostname '127.0.0.1' in certificate" in results["ip-only"], results["ip-only"]

"""The PostgreSQL role: its setting, its secrets, what lands on the members, checked by the real
tools (patroni --validate-config, openssl, nft, shellcheck, systemd-analyze), and the status
page's reading of Patroni. The cluster itself runs in tests/e2e/test_lab_postgres.py."""
import asyncio
import json
import re
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

import program
from components import config, keys, pgconfig, render
from components.nodes.remote import install_step, spoke_node
from components.roles import firewall, postgres, spoke_roles, status
from conftest import need_tool
from status import dstack_vpn_status as svc

SSH_KEY = keys.ssh_key_pair("pg")[0]
HOST_KEY = keys.ssh_key_pair("h")[1]
CMD = "command:remote:Command"
SPOKES = [
    {"name": "node-a", "kind": "droplet", "address": "10.88.0.11", "image": "debian-12-x64"},
    {"name": "node-b", "kind": "ssh", "address": "10.88.0.12", "host": "198.51.100.21", "hostKey": HOST_KEY},
    {"name": "node-c", "kind": "ssh", "address": "10.88.0.13", "host": "198.51.100.22", "hostKey": HOST_KEY},
    {"name": "node-d", "kind": "dstack", "address": "10.88.0.14", "containerImage": program.SPOKE_IMAGE},
    {"name": "node-e", "kind": "ssh", "address": "10.88.0.15", "host": "198.51.100.23", "hostKey": HOST_KEY},
]
PG = {"members": ["node-a", "node-b", "node-e"], "version": 15, "users": ["app"],
      "databases": [{"name": "app", "owner": "app"}], "clients": ["node-c"]}


def raw(pg=None, spokes=None):
    values = {"adminCidrs": ["203.0.113.10/32"], "sshPrivateKey": SSH_KEY, "spokes": spokes or SPOKES,
              "postgres": PG if pg is None else pg}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def parse(pg=None, **changes):
    return config.parse(raw({**(PG if pg is None else pg), **changes}))


def node(cfg, name, secrets=None):
    return spoke_node(cfg, next(s for s in cfg.spokes if s.name == name), hub_endpoint="203.0.113.5",
                      hub_public_key="srhWIN5T+BTQx1LV1XJDrZdCeAA6V0kqz7fUIVkXyUw=", secrets=secrets)


# -- the setting --------------------------------------------------------------------------

def test_the_example_setting_parses():
    p = parse().postgres
    assert p.members == ("node-a", "node-b", "node-e") and p.version == 15 and p.synchronous and p.keep_data
    assert p.databases == (pgconfig.Database("app", "app"),) and p.clients == ("node-c",)
    assert p.all_users == ("postgres", "replicator", "app")


def test_no_setting_no_cluster():
    values = raw()
    del values["postgres"]
    assert config.parse(values).postgres is None


def test_one_member_is_a_single_server():
    assert parse(members=["node-b"]).postgres.members == ("node-b",)


@pytest.mark.parametrize("change, message", [
    ({"members": ["node-a", "node-x", "node-e"]}, r"postgres.members\[1\]: 'node-x' is not a node"),
    ({"members": ["node-a", "node-b"]}, r"postgres.members: 2 members; etcd needs a majority"),
    ({"members": ["node-a", "node-b", "node-c", "node-e"]}, r"4 members"),
    ({"members": []}, r"0 members"),
    ({"members": ["hub", "node-b", "node-e"]}, r"postgres.members\[0\]: the hub is a plain router"),
    ({"members": ["node-a", "node-a", "node-b"]}, r"'node-a' is listed twice"),
    ({"members": ["node-a", "node-b", "node-d"]}, r"postgres.members\[2\]: 'node-d' is a dstack spoke"),
    ({"version": 14}, r"postgres.version: 14 is not a version"),
    ({"version": "sixteen"}, r"postgres.version: 'sixteen' is not a version"),
    ({"version": True}, r"postgres.version: True is not a version"),
    ({"version": 16}, r"'node-a' runs debian-12-x64, whose PostgreSQL is 15, not 16"),
    ({"clients": ["node-z"]}, r"postgres.clients\[0\]: 'node-z' is not a node"),
    ({"clients": ["hub"]}, r"postgres.clients\[0\]: the hub"),
    ({"clients": ["node-b"]}, r"postgres.clients\[0\]: 'node-b' is a member"),
    ({"users": ["App"]}, r"postgres.users\[0\]: 'App' is not a plain SQL name"),
    ({"users": ["replicator"]}, r"the cluster's own"),
    ({"users": ["pg_monitor"]}, r"the cluster's own"),
    ({"users": ["app", "app"]}, r"listed twice"),
    ({"databases": [{"name": "app", "owner": "bob"}]}, r"postgres.databases\[0\].owner: 'bob' is not in postgres.users"),
    ({"databases": [{"name": "template1"}]}, r"the cluster's own"),
    ({"databases": [{"name": "x; drop", "owner": "app"}]}, r"not a plain SQL name"),
    ({"parameters": {"listen_addresses": "*"}}, r"postgres.parameters.listen_addresses: set by the program"),
    ({"parameters": {"ssl": False}}, r"postgres.parameters.ssl: set by the program"),
    ({"parameters": {"work_mem": "8MB'; x"}}, r"postgres.parameters.work_mem: .* has characters"),
    ({"parameters": {"Bad-Name": 1}}, r"not a PostgreSQL parameter name"),
    ({"synchronous": "yes"}, r"postgres.synchronous: expected true or false"),
    ({"keepData": 0}, r"postgres.keepData: expected true or false"),
    ({"passwordRotation": {"bob": 1}}, r"postgres.passwordRotation.bob: 'bob' is not a user"),
    ({"passwordRotation": {"app": -1}}, r"negative"),
    ({"replicas": 2}, r"postgres: unknown setting 'replicas'"),
])
def test_bad_settings_are_refused_naming_the_setting(change, message):
    with pytest.raises(config.ConfigError, match=message):
        parse(**change)


def test_members_are_required():
    with pytest.raises(config.ConfigError, match="postgres.members: required"):
        config.parse(raw(pg={"version": 15}))


@pytest.mark.parametrize("bad", [
    {**PG, "members": ["node-a", "node-b"]}, {**PG, "members": ["hub", "node-a", "node-b"]},
    {**PG, "version": 12}, {**PG, "clients": ["nobody"]}, {**PG, "members": ["node-a", "nobody", "node-b"]}])
def test_bad_input_registers_nothing(bad):
    """Refused before any resource exists: no key, no droplet, no step."""
    settings = program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres=bad)
    with pytest.raises(Exception, match="invalid stack config: postgres"):
        program.run(settings)


# -- secrets, outputs, the program ----------------------------------------------------------

@pytest.fixture(scope="module")
def run():
    return program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres=PG))


def secret_texts(run):
    texts = set(run.made_secrets) | {SSH_KEY}
    for t in list(texts):  # each line of a PEM body too, in case one was reflowed into a file
        texts |= {line for line in t.splitlines() if len(line) >= 24 and "PRIVATE KEY" not in line}
    # An EC key's PEM ends with its public point, which its certificate holds too: a line of
    # that (public) certificate is no secret
    public = run.outputs["postgres"]["caCertificate"]
    return {t for t in texts if t not in public}


def test_the_cluster_is_keys_and_steps_on_its_nodes(run):
    names = {r.name for r in run.of_type(program.DYNAMIC)}
    assert {"postgres-ca", "postgres-postgres-password", "postgres-replicator-password", "postgres-app-password",
            "node-a-postgres-cert", "node-b-postgres-cert", "node-e-postgres-cert"} <= names
    steps = sorted(r.name for r in run.of_type(CMD) if r.name.endswith(("-etcd", "-postgres", "-postgres-client")))
    assert steps == ["node-a-etcd", "node-a-postgres", "node-b-etcd", "node-b-postgres", "node-c-postgres-client",
                     "node-e-etcd", "node-e-postgres"]
    # the last member sets the cluster up once every other member's Patroni runs
    deps = {r.name: r for r in run.of_type(CMD)}
    assert {deps["node-a-postgres"].urn, deps["node-b-postgres"].urn} <= set(deps["node-e-postgres"].dependencies)
    for name in ("node-a-etcd", "node-a-postgres", "node-e-postgres"):
        assert program.is_secret_marker(deps[name].inputs["stdin"]), name
        assert deps[name].inputs["logging"] == "none"
    # the certificates name the member's overlay address
    cert = program.unwrap(run.named("node-b-postgres-cert", program.DYNAMIC).inputs)
    assert cert["names"] == ["10.88.0.12", "node-b"]


def test_no_secret_in_any_plain_input_output_or_command_text(run):
    secrets = secret_texts(run)
    assert len([s for s in run.made_secrets if s]) >= 7 + 4
    assert program.secret_leaks(run, {s[:6]: s for s in secrets}) == []
    # the scan can see: the passwords are in the (secret) stdin of the setting-up step
    passwords = run.outputs["postgresPasswords"]
    stdin = json.loads(program.unwrap(run.named("node-e-postgres", CMD).inputs["stdin"]).rsplit("\n", 2)[0])
    assert passwords["postgres"] in stdin["patroni.yml"] and passwords["app"] not in json.dumps(stdin)


def test_outputs_reach_the_primary_and_the_replicas_over_tls(run):
    out = run.outputs["postgres"]
    assert "postgres" not in run.secret_outputs and "postgresPasswords" in run.secret_outputs
    hosts = "10.88.0.11:5432,10.88.0.12:5432,10.88.0.15:5432"
    tls = ("sslmode=verify-full&sslrootcert=/usr/local/share/dstack-vpn/postgres-ca.crt&connect_timeout=5"
           "&tcp_user_timeout=15000&keepalives_idle=10&keepalives_interval=5&keepalives_count=1")
    assert out["primary"] == {"app": f"postgresql://app@{hosts}/app?{tls}&target_session_attrs=read-write"}
    assert out["replicas"] == {"app": f"postgresql://app@{hosts}/app?{tls}&target_session_attrs=prefer-standby"}
    assert out["caCertificate"].startswith("-----BEGIN CERTIFICATE-----")
    psql = need_tool("psql")  # libpq takes every parameter (a misspelt one is refused before connecting)
    for uri in (out["primary"]["app"], out["replicas"]["app"]):
        check = subprocess.run([psql, "-X", "-c", "select 1", uri.replace("10.88.0.11:5432,10.88.0.12:5432,10.88.0.15:5432",
                                                                            "127.0.0.1:1")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode != 0 and "invalid" not in check.stderr, check.stderr
    assert out["members"] == {"node-a": "10.88.0.11", "node-b": "10.88.0.12", "node-e": "10.88.0.15"}
    assert set(run.outputs["postgresPasswords"]) == {"postgres", "replicator", "app"}


def test_a_rotation_makes_only_that_users_password_anew():
    a = program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES, postgres=PG), seed="pg")
    b = program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=SPOKES,
                                         postgres={**PG, "passwordRotation": {"app": 1}}), seed="pg")
    pa, pb = (r.outputs["postgresPasswords"] for r in (a, b))
    assert pa["app"] != pb["app"] and pa["postgres"] == pb["postgres"] and pa["replicator"] == pb["replicator"]


# -- certificates and passwords -------------------------------------------------------------

def test_member_certificates_verify_against_the_ca_for_server_and_client(tmp_path):
    openssl = need_tool("openssl")
    ca = keys.make("tls-ca", "dstack-vpn postgres CA")
    cert = keys.make("tls-cert", "node-a", ["10.88.0.11", "node-a"], ca["private_key"], ca["public_key"])
    other = keys.make("tls-ca", "another CA")
    (tmp_path / "ca.pem").write_text(ca["public_key"])
    (tmp_path / "other.pem").write_text(other["public_key"])
    (tmp_path / "cert.pem").write_text(cert["public_key"])
    for purpose in ("sslserver", "sslclient"):
        ok = subprocess.run([openssl, "verify", "-CAfile", tmp_path / "ca.pem", "-purpose", purpose,
                             "-verify_ip", "10.88.0.11", tmp_path / "cert.pem"], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong_ip = subprocess.run([openssl, "verify", "-CAfile", tmp_path / "ca.pem", "-verify_ip", "10.88.0.12",
                               tmp_path / "cert.pem"], capture_output=True, text=True)
    assert wrong_ip.returncode != 0
    wrong_ca = subprocess.run([openssl, "verify", "-CAfile", tmp_path / "other.pem", tmp_path / "cert.pem"],
                              capture_output=True, text=True)
    assert wrong_ca.returncode != 0


def test_passwords_are_long_random_and_plain_characters():
    made = {keys.make("password")["private_key"] for _ in range(20)}
    assert len(made) == 20
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", p) for p in made)


def test_scram_verifier_matches_rfc7677_vector():
    """RFC 7677's example: user 'user', password 'pencil', salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096
    iterations; the server key and stored key follow from them (checked by PostgreSQL's own
    formula: StoredKey = H(HMAC(SaltedPassword, "Client Key")))."""
    import base64
    import hashlib
    import hmac
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    # RFC 7677 section 3: the client proof for the given exchange checks out with this salted password
    auth = (b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    assert base64.b64encode(proof).decode() == "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    # ours computes the same keys from the same salted password (its salt is its own)
    verifier = keys.scram_sha256("app", "pencil")
    m = re.fullmatch(r"SCRAM-SHA-256\$4096:([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)", verifier)
    own_salt = base64.b64decode(m.group(1))
    own_salted = hashlib.pbkdf2_hmac("sha256", b"pencil", own_salt, 4096)
    assert base64.b64decode(m.group(2)) == hashlib.sha256(hmac.new(own_salted, b"Client Key", "sha256").digest()).digest()
    assert base64.b64decode(m.group(3)) == hmac.new(own_salted, b"Server Key", "sha256").digest()
    assert keys.scram_sha256("app", "pencil") == verifier and "pencil" not in verifier


# -- what lands on a member -----------------------------------------------------------------

PASSWORDS = {"postgres": "p" * 32, "replicator": "r" * 32, "app": "a" * 32}


def test_pg_hba_allows_tls_only_and_only_members_and_clients():
    cfg = parse()
    rules = postgres.pg_hba(cfg)
    assert rules[0] == "local all postgres peer"
    assert all(r.startswith("hostssl ") for r in rules[1:])
    sources = {r.split()[3] for r in rules[1:]}
    assert sources == {"10.88.0.11/32", "10.88.0.12/32", "10.88.0.15/32", "10.88.0.13/32"}
    assert not [r for r in rules if "replication" in r and "10.88.0.13" in r]  # a client never replicates


def test_patroni_config_passes_patronis_own_validation(tmp_path):
    cfg = parse()
    text = postgres.patroni_config(cfg, "node-a", "10.88.0.11", PASSWORDS)
    doc = yaml.safe_load(text)
    assert doc["restapi"]["listen"] == "10.88.0.11:8008" and doc["postgresql"]["listen"] == "10.88.0.11:5432"
    assert doc["postgresql"]["parameters"]["ssl"] == "on"
    assert doc["bootstrap"]["dcs"]["synchronous_mode"] is True
    assert doc["etcd3"]["protocol"] == "https" and len(doc["etcd3"]["hosts"]) == 3
    assert doc["postgresql"]["authentication"]["replication"]["sslmode"] == "verify-full"
    patroni = need_tool("patroni")
    # Patroni checks the files it names: stand them up under a copy of the config
    for name in ("member.crt", "member.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    text = text.replace(postgres.CONF_DIR, str(tmp_path))
    data = tmp_path / "data"
    text = text.replace(postgres.data_dir(cfg.postgres), str(data))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for binary in ("pg_ctl", "initdb", "pg_controldata", "pg_basebackup", "postgres", "pg_isready", "pg_rewind"):
        (bin_dir / binary).write_text("#!/bin/sh\n")
        (bin_dir / binary).chmod(0o755)
    text = text.replace("/usr/lib/postgresql/15/bin", str(bin_dir))
    path = tmp_path / "patroni.yml"
    path.write_text(text)
    out = subprocess.run([patroni, "--validate-config", str(path)], capture_output=True, text=True)
    # Patroni 3.0 checks that its ports are free on this machine, where 10.88.0.11 is no address
    # (it counts that as "in use"), and wants two settings it has defaults for
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip() and not (
        "is already in use" in line or line.strip() in ("bootstrap.pg_hba  is not defined.",
                                                         "postgresql.authentication.rewind  is not defined."))]
    assert problems == [], out.stdout + out.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(text.replace(str(bin_dir), str(tmp_path / "no-such-bin")))
    out = subprocess.run([patroni, "--validate-config", str(broken)], capture_output=True, text=True)
    assert "no-such-bin" in out.stdout + out.stderr


def test_parameters_reach_patroni_and_asynchronous_is_honoured():
    cfg = parse(parameters={"work_mem": "8MB", "max_connections": 200}, synchronous=False)
    doc = yaml.safe_load(postgres.patroni_config(cfg, "node-a", "10.88.0.11", PASSWORDS))
    assert doc["postgresql"]["parameters"]["work_mem"] == "8MB"
    assert doc["postgresql"]["parameters"]["max_connections"] == "200"
    assert doc["bootstrap"]["dcs"]["synchronous_mode"] is False


def test_etcd_listens_on_the_overlay_with_tls_and_client_certificates():
    env = dict(line.split("=", 1) for line in postgres.etcd_env(parse(), "node-b", "10.88.0.12").splitlines()
               if line and not line.startswith("#"))
    assert env["ETCD_LISTEN_CLIENT_URLS"] == "https://10.88.0.12:2379"
    assert env["ETCD_LISTEN_PEER_URLS"] == "https://10.88.0.12:2380"
    assert env["ETCD_CLIENT_CERT_AUTH"] == "true" and env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert env["ETCD_INITIAL_CLUSTER"] == ("node-a=https://10.88.0.11:2380,node-b=https://10.88.0.12:2380,"
                                           "node-e=https://10.88.0.15:2380")


def test_setup_sql_holds_verifiers_never_passwords():
    sql = postgres.setup_sql(parse(), PASSWORDS)
    assert not [p for p in PASSWORDS.values() if p in sql]
    for user in PASSWORDS:
        assert f"ALTER ROLE {user} PASSWORD '{keys.scram_sha256(user, PASSWORDS[user])}';" in sql
    assert "CREATE DATABASE app OWNER app" in sql
    assert not [line for line in sql.splitlines() if "DROP" in line.upper() and not line.startswith("--")]


def test_members_install_the_server_clients_the_client_others_nothing():
    cfg = parse()
    packages = {n: install_step(node(cfg, n), spoke_roles()).values["packages"] for n in ("node-a", "node-c", "node-b")}
    assert {"postgresql-15", "patroni", "etcd-server", "etcd-client"} <= set(packages["node-a"])
    assert "postgresql-client" in packages["node-c"] and "patroni" not in packages["node-c"]
    no_cluster = config.parse({k: v for k, v in raw().items() if k != "postgres"})
    plain = install_step(node(no_cluster, "node-a"), spoke_roles()).values
    assert "preinstall" not in plain and not [p for p in plain["packages"] if "postgres" in p]
    member = install_step(node(cfg, "node-a"), spoke_roles()).values
    assert "create_main_cluster = false" in member["preinstall"][postgres.NO_MAIN_CLUSTER]


def test_member_firewall_opens_the_cluster_to_members_and_clients_only(tmp_path):
    from test_render import nft_check

    cfg = parse()
    text = render.render("nftables/spoke.nft", **firewall.values(node(cfg, "node-b")))
    nft_check(tmp_path, text)
    members = "10.88.0.11, 10.88.0.12, 10.88.0.15"
    assert f'iifname "wg0" tcp dport 5432 ip saddr != {{ {members}, 10.88.0.13 }} drop' in text
    for port in (8008, 2379, 2380):
        assert f'iifname "wg0" tcp dport {port} ip saddr != {{ {members} }} drop' in text
    # before the rule that lets other spokes in; after the hub's drop
    assert text.index("ip saddr 10.88.0.1 drop") < text.index("dport 5432") < text.index("ip saddr 10.88.0.0/24 accept")
    # a client's and an outsider's ruleset are what they were without a cluster
    no_cluster = config.parse({k: v for k, v in raw().items() if k != "postgres"})
    for name in ("node-c",):
        assert render.render("nftables/spoke.nft", **firewall.values(node(cfg, name))) == \
            render.render("nftables/spoke.nft", **firewall.values(node(no_cluster, name)))


def _member_scripts(cfg, name):
    secrets = {"postgres": postgres.Secrets()}
    n = node(cfg, name, secrets)
    values = {"etcd": postgres.etcd_values(n), "postgres": postgres.member_values(n)}
    for step, v in values.items():
        for undo in ("", "-undo"):
            yield f"{step}{undo}", render.script(step, f"scripts/{step}{undo}.sh", **v)
    for undo in ("", "-undo"):
        yield f"postgres-client{undo}", render.script("postgres-client", f"scripts/postgres-client{undo}.sh",
                                                      ca_path=postgres.CA_PATH)


@pytest.mark.parametrize("member", ["node-a", "node-e"])  # node-e sets the cluster up
def test_the_scripts_pass_shellcheck(member, tmp_path):
    shellcheck = need_tool("shellcheck")
    for name, text in _member_scripts(parse(keepData=member == "node-a"), member):
        path = tmp_path / f"{name}.sh"
        path.write_text(text)
        out = subprocess.run([shellcheck, "-s", "bash", "-S", "warning", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, name + "\n" + out.stdout


def test_undo_keeps_the_data_unless_told():
    keep = dict(_member_scripts(parse(), "node-b"))
    drop = dict(_member_scripts(parse(keepData=False), "node-b"))
    assert "rm -rf /var/lib/postgresql/15/dstack-vpn" not in keep["postgres-undo"]
    assert "rm -rf /var/lib/postgresql/15/dstack-vpn" in drop["postgres-undo"]
    assert "rm -rf /var/lib/etcd/dstack-vpn" not in keep["etcd-undo"]
    assert "rm -rf /var/lib/etcd/dstack-vpn" in drop["etcd-undo"]


def test_only_the_last_member_sets_the_cluster_up():
    scripts = {m: dict(_member_scripts(parse(), m))["postgres"] for m in ("node-a", "node-e")}
    assert "setup.sql" in scripts["node-e"] and "target_session_attrs=read-write" in scripts["node-e"]
    # and hands the lead over where the leader is leaving the cluster
    assert "switchover dstack-vpn" in scripts["node-e"] and "switchover" not in scripts["node-a"]
    assert "psql" not in scripts["node-a"]


@pytest.mark.parametrize("unit", ["dstack-vpn-etcd.service", "dstack-vpn-patroni.service"])
def test_the_units_verify(unit, tmp_path):
    need_tool("systemd-analyze")
    cfg = parse()
    n = node(cfg, "node-b")
    path = tmp_path / unit
    path.write_text(render.render(f"systemd/{unit}", **postgres.etcd_values(n), **{
        k: v for k, v in postgres.member_values(n).items() if k not in postgres.etcd_values(n)}))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    # the binaries are the hosts' (etcd, patroni): systemd-analyze names them when missing here
    problems = [line for line in out.stderr.splitlines()
                if line.strip() and "Command /usr/bin/etcd is not executable" not in line
                and "/usr/bin/patroni" not in line]
    assert problems == [], out.stderr


def test_the_status_page_of_a_member_asks_patroni():
    cfg = parse()
    member, client = (status.values(node(cfg, n)) for n in ("node-a", "node-c"))
    assert member["patroni_url"] == "https://10.88.0.11:8008" and member["patroni_ca"] == postgres.CA_PATH
    assert client["patroni_url"] == ""


# -- the status page's reading of Patroni --------------------------------------------------

def run_async(coro):
    """On a loop of its own (asyncio.run would leave the thread without one: Pulumi's mocks
    in later tests want theirs)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.fixture
def fake_patroni(tmp_path):
    """Patroni's REST API as far as the page reads it: HTTPS with a certificate from our CA."""
    ca = keys.make("tls-ca", "test CA")
    cert = keys.make("tls-cert", "node-a", ["127.0.0.1"], ca["private_key"], ca["public_key"])
    (tmp_path / "ca.crt").write_text(ca["public_key"])
    (tmp_path / "cert.pem").write_text(cert["public_key"] + cert["private_key"])
    answer = {"body": {"state": "running", "role": "master"}, "status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(answer["body"]).encode()
            self.send_response(answer["status"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", str(tmp_path / "ca.crt"), answer
    server.shutdown()
    server.server_close()


def test_patroni_role_is_read_over_tls(fake_patroni, tmp_path):
    url, ca, answer = fake_patroni
    assert run_async(svc.patroni_role(url, ca, 2)) == {"role": "primary", "state": "running", "source": "patroni"}
    answer.update(body={"state": "running", "role": "replica"}, status=503)
    assert run_async(svc.patroni_role(url, ca, 2))["role"] == "replica"
    # a server whose certificate another CA signed is not believed
    other = keys.make("tls-ca", "other")["public_key"]
    (tmp_path / "other.crt").write_text(other)
    assert run_async(svc.patroni_role(url, str(tmp_path / "other.crt"), 2))["role"] is None


def test_patroni_down_gives_no_role():
    assert run_async(svc.patroni_role("https://127.0.0.1:1", "/nonexistent", 1)) == {
        "role": None, "state": None, "source": "patroni"}


@pytest.mark.parametrize("argv, env, asks", [
    (["--patroni-url", "https://10.88.0.11:8008"], {}, True),
    (["--patroni-url=https://10.88.0.11:8008"], {}, True),
    (["--patroni-url", ""], {}, False),
    ([], {"DSTACK_VPN_STATUS_PATRONI_URL": "https://x:8008"}, True),
    (["--node-name", "a"], {}, False),
])
def test_tls_is_loaded_only_where_the_page_asks_patroni(argv, env, asks):
    assert svc._asks_patroni(argv, env) is asks


def test_the_page_without_patroni_still_runs_without_ssl(tmp_path):
    """Run as a program on a spoke outside the cluster, the page never loads OpenSSL."""
    import sys
    script = render.STATUS_PROGRAM
    out = subprocess.run([sys.executable, "-I", "-c",
                          f"import sys, runpy\nsys.argv = ['{script}', '--help']\n"
                          f"try:\n    runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                          "print('ssl' in sys.modules and sys.modules['ssl'] is not None)"],
                         capture_output=True, text=True)
    assert out.stdout.strip().endswith("False"), out.stdout + out.stderr


@pytest.mark.parametrize("stack", ["Pulumi.dev.yaml", "lab/Pulumi.lab.yaml"])
def test_the_example_stacks_have_a_three_member_cluster(stack):
    settings = program.stack_config(program.ROOT / stack, sshPrivateKey=SSH_KEY)
    if stack.startswith("lab/"):  # the lab adds its object store's key (lab/example.py)
        settings.update(backupAccessKeyId="LABKEY0000000000", backupSecretAccessKey="lab-secret-0000000000")
    settings["spokes"] = [dict(s, hostKey=HOST_KEY) if s["kind"] == "ssh" else s for s in settings["spokes"]]
    settings["spokes"] = [dict(s, containerImage=program.SPOKE_IMAGE) if s["kind"] == "dstack" else s
                          for s in settings["spokes"]]
    cfg = config.parse({k: v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()})
    assert len(cfg.postgres.members) == 3 and cfg.postgres.databases
    assert cfg.postgres.backup.repository.type == ("s3" if stack.startswith("lab/") else "spaces")


def test_a_certificate_is_made_anew_when_its_names_or_issuer_change_and_other_keys_are_untouched():
    provider = keys.KeyProvider()
    wg = {"kind": "wireguard", "rotation": 0, "comment": ""}  # a key as older code stored it
    assert not provider.diff("id", wg, dict(wg)).changes
    cert = {"kind": "tls-cert", "rotation": 0, "comment": "node-a", "names": ["10.88.0.11", "node-a"],
            "issuer_cert": "CA-1"}
    assert not provider.diff("id", cert, dict(cert)).changes
    assert provider.diff("id", cert, {**cert, "names": ["10.88.0.12", "node-a"]}).replaces == ["names"]
    assert provider.diff("id", cert, {**cert, "issuer_cert": "CA-2"}).replaces == ["issuer_cert"]


def test_a_new_member_joins_the_running_store_and_a_leaving_one_leaves_it():
    scripts = dict(_member_scripts(parse(), "node-b"))
    etcd = scripts["etcd"]
    # it asks the other members (never itself) and registers itself only where it is not yet
    assert "https://10.88.0.11:2379 https://10.88.0.15:2379; do" in etcd and "10.88.0.12:2379;" not in etcd
    assert "member add node-b --peer-urls=https://10.88.0.12:2380" in etcd
    assert etcd.index("/member ]; then") < etcd.index("member add")  # only a member that never ran
    assert "member remove" in scripts["etcd-undo"]
    converging = dict(_member_scripts(parse(), "node-e"))["postgres"]
    assert "member remove" in converging and "member remove" not in scripts["postgres"]
    unit = render.render("systemd/dstack-vpn-etcd.service", **postgres.etcd_values(node(parse(), "node-b")))
    assert unit.index("etcd.env") < unit.index("EnvironmentFile=-/etc/dstack-vpn-etcd/join.env")

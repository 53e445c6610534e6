"""dstack spokes: the config, the rendered bundle (compose + environment), the spoke image's
entrypoint, the program's outputs and the Phala Cloud deployment, run against a stand-in `phala`
on PATH."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import program
from components import config, keys, render
from components.nodes import dstack
from components.roles import firewall, wireguard
from conftest import need_tool
from image import build as image_build

SSH_KEY = keys.ssh_key_pair("deploy")[0]
API_KEY = "phak_" + "Zx9" * 12
IMAGE = "ghcr.io/example/dstack-vpn-spoke@sha256:" + "ab12" * 16
DSTACK = {"name": "node-d", "kind": "dstack", "address": "10.88.0.14", "containerImage": IMAGE}


def parse(**raw):
    raw.setdefault("adminCidrs", ["203.0.113.10/32"])
    return config.parse({k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()})


# -- config ------------------------------------------------------------------------------

def test_a_dstack_spoke_needs_no_host_and_no_ssh_key():
    cfg = parse(spokes=[DSTACK])
    (spoke,) = cfg.spokes
    assert (spoke.kind, spoke.address, spoke.phala) == ("dstack", "10.88.0.14", None)
    assert spoke.container_image == IMAGE and spoke.preshared_key


@pytest.mark.parametrize("image, message", [
    (None, "spokes[0].containerImage: required for a dstack spoke: the dstack-vpn spoke image by digest"),
    ("debian:bookworm-slim", "spokes[0].containerImage: 'debian:bookworm-slim' is not pinned by digest"),
    ("ghcr.io/example/dstack-vpn-spoke:latest", "is not pinned by digest"),
    ("ghcr.io/example/dstack-vpn-spoke", "is not pinned by digest"),
    ("ghcr.io/example/spoke@sha256:" + "ab" * 31, "is not an image reference"),
    ("ghcr.io/example/spoke@sha256:" + "AB" * 32, "is not an image reference"),
    (IMAGE + "\n", "is not an image reference"),
])
def test_the_image_is_named_by_its_digest_or_refused(image, message):
    """A tag can point at other code after the app's compose was measured: only a digest names
    the code that reads the private key."""
    spoke = {k: v for k, v in DSTACK.items() if k != "containerImage"}
    if image is not None:
        spoke["containerImage"] = image
    with pytest.raises(config.ConfigError) as err:
        parse(spokes=[spoke])
    assert message in str(err.value)


@pytest.mark.parametrize("extra, message", [
    ({"host": "198.51.100.9"}, "spokes[0].host: not for kind 'dstack'"),
    ({"region": "nyc3"}, "spokes[0].region: not for kind 'dstack'"),
    ({"containerImage": "Debian Slim"}, "spokes[0].containerImage: 'Debian Slim' is not an image reference"),
    ({"phala": "yes"}, "spokes[0].phala: expected an object"),
    ({"phala": {"nmae": "x"}}, "spokes[0].phala: unknown setting 'nmae'"),
    ({"phala": {"name": "db"}}, "spokes[0].phala.name: 'db' is not a Phala Cloud CVM name"),
    ({"phala": {"diskSize": 5}}, "spokes[0].phala.diskSize: 5 GB is out of range"),
    ({"phala": {"instanceType": "tdx small"}}, "spokes[0].phala.instanceType: 'tdx small' is not a Phala Cloud slug"),
])
def test_bad_dstack_settings_are_named(extra, message):
    with pytest.raises(config.ConfigError) as err:
        parse(spokes=[{**DSTACK, **extra}], phalaApiKey=API_KEY)
    assert message in str(err.value)


def test_deploying_on_phala_needs_the_api_key_which_is_never_quoted():
    with pytest.raises(config.ConfigError, match="phalaApiKey: required to deploy node-d on Phala Cloud"):
        parse(spokes=[{**DSTACK, "phala": {}}])
    with pytest.raises(config.ConfigError) as err:
        parse(spokes=[{**DSTACK, "phala": {}}], phalaApiKey="two words")
    assert "two words" not in str(err.value)
    cfg = parse(spokes=[{**DSTACK, "phala": {"instanceType": "tdx.small", "diskSize": 40}}], phalaApiKey=API_KEY)
    assert cfg.spokes[0].phala == config.PhalaConfig(name="dstack-vpn-node-d", instance_type="tdx.small", disk_size=40)
    assert API_KEY not in repr(cfg)


def test_settings_of_other_kinds_refuse_dstack_ones():
    with pytest.raises(config.ConfigError, match=r"spokes\[0\].phala: not for kind 'droplet'; only for kind 'dstack'"):
        parse(spokes=[{"name": "node-a", "kind": "droplet", "phala": {}}])
    with pytest.raises(config.ConfigError, match="nodeSecrets.node-d.sshPrivateKey: a dstack spoke is not reached"):
        parse(spokes=[DSTACK], nodeSecrets={"node-d": {"sshPrivateKey": SSH_KEY}})


# -- the bundle -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle():
    cfg = parse(spokes=[DSTACK])
    private, psk = keys.wireguard_private_key(), keys.preshared_key()
    hub_public = keys.wireguard_public_key(keys.wireguard_private_key())
    node = dstack.dstack_node(cfg, cfg.spokes[0], keys.wireguard_public_key(private), hub_public, "203.0.113.5")
    return {"compose": dstack.compose(node), "env": dstack.env_file(private, psk), "node": node,
            "secrets": {"private": private, "psk": psk}}


def test_compose_runs_the_image_by_digest_on_the_hosts_network(bundle):
    service = yaml.safe_load(bundle["compose"])["services"]["dstack-vpn"]
    assert service["network_mode"] == "host" and service["cap_add"] == ["NET_ADMIN"]
    assert service["restart"] == "always" and service["image"] == IMAGE
    assert service["tmpfs"] == ["/run/dstack-vpn:mode=0700"]
    # the image's own entrypoint runs: no script of the compose's, nothing installed at start
    assert "entrypoint" not in service and "command" not in service
    assert "apt-get" not in bundle["compose"]
    env = service["environment"]
    assert env["DSTACK_VPN_BUNDLE"] == str(dstack.BUNDLE)
    assert (env["DSTACK_VPN_NODE"], env["DSTACK_VPN_ADDRESS"], env["DSTACK_VPN_STATUS_PORT"]) == \
        ("node-d", "10.88.0.14", "8000")
    # the public key is pinned, so a swapped environment is refused
    assert env["DSTACK_VPN_PUBLIC_KEY"] == bundle["node"].public_key
    assert "# dstack-vpn firewall of a dstack spoke" in env["DSTACK_VPN_FIREWALL"]
    assert "[Interface]" in env["DSTACK_VPN_WIREGUARD"]
    assert env["DSTACK_VPN_PRIVATE_KEY"].startswith("${DSTACK_VPN_PRIVATE_KEY:?")


def compose_environment(**spoke) -> dict:
    cfg = parse(spokes=[{**DSTACK, **spoke}])
    hub_public = keys.wireguard_public_key(keys.wireguard_private_key())
    node = dstack.dstack_node(cfg, cfg.spokes[0], keys.wireguard_public_key(keys.wireguard_private_key()),
                              hub_public, "203.0.113.5")
    return yaml.safe_load(dstack.compose(node))["services"]["dstack-vpn"]["environment"]


def test_the_compose_sets_every_variable_the_image_reads(bundle):
    """The image's entrypoint and the compose file are one contract (dstack.BUNDLE); the TCP
    transport's variables are set where the spoke's transport uses them."""
    entrypoint = image_build.files()[image_build.ENTRYPOINT][1]
    read = set(re.findall(r"\b(DSTACK_VPN_[A-Z_]+)", entrypoint)) - {"DSTACK_VPN_STAGE"}
    service = yaml.safe_load(bundle["compose"])["services"]["dstack-vpn"]
    assert read == set(service["environment"]) | {"DSTACK_VPN_TCP_TRANSPORT", "DSTACK_VPN_AUTO"}
    assert read == set(compose_environment(transport="auto"))
    assert read - {"DSTACK_VPN_AUTO"} == set(compose_environment(transport="tcp"))


def test_a_compose_that_needs_the_tcp_transport_asks_for_an_image_that_has_it():
    """Bundle 2 (any image) unless the spoke's transport is tcp or auto: an image of bundle 2 has
    no v2ray, and refuses bundle 3 by name; this image reads both."""
    assert compose_environment()["DSTACK_VPN_BUNDLE"] == "2"
    assert compose_environment(transport="tcp")["DSTACK_VPN_BUNDLE"] == "3"
    assert compose_environment(transport="auto")["DSTACK_VPN_BUNDLE"] == "3"
    entrypoint = image_build.files()[image_build.ENTRYPOINT][1]
    assert '\n2 | 3) ;;\n' in entrypoint


def test_a_dstack_spokes_transport_reaches_its_compose():
    env = compose_environment(transport="auto", mtu=1280)
    assert "Endpoint = 203.0.113.5:51820\n" in env["DSTACK_VPN_WIREGUARD"]
    assert "MTU = 1200\n" in env["DSTACK_VPN_WIREGUARD"]
    assert env["DSTACK_VPN_AUTO"] == "203.0.113.5:51820 127.0.0.1:51821"
    tcp = json.loads(env["DSTACK_VPN_TCP_TRANSPORT"])
    assert tcp["outbounds"][0]["settings"]["vnext"][0]["address"] == "203.0.113.5"
    assert tcp["inbounds"][0]["listen"] == "127.0.0.1" and tcp["inbounds"][0]["port"] == 51821
    env = compose_environment(transport="tcp")
    assert "Endpoint = 127.0.0.1:51821\n" in env["DSTACK_VPN_WIREGUARD"]
    assert "MTU = 1420\n" in env["DSTACK_VPN_WIREGUARD"]  # not loopback's (wg-quick's reckoning)


def test_compose_holds_no_secret(bundle):
    for secret in bundle["secrets"].values():
        assert secret not in bundle["compose"]
        assert secret in bundle["env"]  # (the scan can see them where they are)


def test_docker_compose_reads_it(bundle, tmp_path):
    compose = shutil.which("docker-compose")
    argv = [compose, "config"] if compose else None
    if argv is None and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        argv = ["docker", "compose", "config"]
    if argv is None:
        need_tool("docker-compose")
    (tmp_path / "docker-compose.yml").write_text(bundle["compose"])
    missing = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode != 0 and "lacks DSTACK_VPN_PRIVATE_KEY" in missing.stdout + missing.stderr
    (tmp_path / ".env").write_text(bundle["env"])
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    env = yaml.safe_load(out.stdout)["services"]["dstack-vpn"]["environment"]
    ours = render.render("nftables/dstack.nft", **firewall.dstack_values(bundle["node"])).rstrip("\n")
    assert env["DSTACK_VPN_FIREWALL"].rstrip("\n") == ours  # `$$` read back as `$`, lines kept
    assert env["DSTACK_VPN_PRIVATE_KEY"] == bundle["secrets"]["private"]


def test_entrypoint_passes_shellcheck(tmp_path):
    shellcheck = need_tool("shellcheck")
    path = tmp_path / "entrypoint.sh"
    path.write_text(image_build.files()[image_build.ENTRYPOINT][1])
    out = subprocess.run([shellcheck, "-s", "bash", "-S", "warning", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_the_image_holds_the_entrypoint_and_the_status_program_and_no_node_of_its_own(bundle):
    files = image_build.files()
    assert set(files) == {image_build.ENTRYPOINT, dstack.STATUS_PROGRAM, wireguard.WATCHDOG}
    assert files[dstack.STATUS_PROGRAM][1] == render.status_program()
    entrypoint = files[image_build.ENTRYPOINT][1]
    assert "apt-get" not in entrypoint and "{{" not in entrypoint
    for value in ("node-d", "10.88.0.14", bundle["node"].public_key, bundle["node"].hub_public_key):
        assert value not in entrypoint
    assert set(image_build.PACKAGES) >= {"wireguard-tools", "wireguard-go", "nftables", "iproute2", "python3",
                                         "iputils-ping"}


def test_wireguard_config_reads_its_keys_from_files(bundle, tmp_path):
    from test_render import wg_quick_strip
    text = dstack.environment(bundle["node"])["DSTACK_VPN_WIREGUARD"] + "\n"
    assert "PrivateKey" not in text and "PresharedKey" not in text
    assert "PostUp = wg set %i private-key /run/dstack-vpn/private-key peer" in text
    assert "Endpoint = 203.0.113.5:51820" in wg_quick_strip(tmp_path, text)


def test_dstack_ruleset_loads_and_leaves_dstacks_own_traffic_alone(bundle, tmp_path):
    from test_render import nft_check
    text = dstack.environment(bundle["node"])["DSTACK_VPN_FIREWALL"] + "\n"
    nft_check(tmp_path, text)
    assert "flush ruleset" not in text and 'iifname != "wg0" accept' in text
    assert text.index("ip saddr 10.88.0.1 drop") < text.index("ip saddr 10.88.0.0/24 accept")


# -- the program --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run():
    spokes = program.stack_config()["spokes"] + [{**DSTACK, "phala": {"instanceType": "tdx.small"}}]
    return program.run(program.stack_config(sshPrivateKey=SSH_KEY, spokes=spokes, phalaApiKey=API_KEY))


def test_the_hub_gets_the_dstack_spoke_as_a_peer_and_nothing_logs_in_to_it(run):
    hub_conf = program.unwrap(run.named("hub-wireguard").inputs)["stdin"]
    assert "AllowedIPs = 10.88.0.14/32" in hub_conf
    assert run.outputs["nodes"]["node-d"]["public_key"] in hub_conf
    assert not [r.name for r in run.of_type("command:remote:Command") if r.name.startswith("node-d")]
    (app,) = run.of_type("command:local:Command")
    assert app.name == "node-d-phala-app"
    assert run.named("hub-wireguard").urn in app.dependencies


def test_the_environment_is_a_secret_output_and_the_compose_a_plain_one(run):
    assert "dstackEnv" in run.secret_outputs and "dstackCompose" not in run.secret_outputs
    env = run.outputs["dstackEnv"]["node-d"]
    assert env.startswith("DSTACK_VPN_PRIVATE_KEY=") and "DSTACK_VPN_PRESHARED_KEY=" in env
    secrets = set(run.made_secrets) | {API_KEY}
    assert not [s[:6] for s in secrets if s in run.outputs["dstackCompose"]["node-d"]]


def test_the_deploy_command_takes_its_secrets_on_stdin(run):
    (app,) = run.of_type("command:local:Command")
    assert set(app.inputs["environment"]) == {"DSTACK_VPN_COMPOSE"}
    assert program.is_secret_marker(app.inputs["stdin"])
    key_line, env_file = program.unwrap(app.inputs["stdin"]).split("\n", 1)
    assert key_line == API_KEY and env_file.startswith(dstack.ENV_PRIVATE_KEY + "=")
    secrets = set(run.made_secrets) | {API_KEY}
    plain = [t for t in program.plain_strings(app.inputs)]
    assert not [s[:6] for s in secrets for t in plain if s in t]
    assert app.delete_before_replace


# -- the deployment, against a stand-in `phala` ----------------------------------------------

# The stand-in takes its switches from files beside its folder: the CLI's environment is an
# allow-list, which would not carry them.
STAND_IN = r'''#!/usr/bin/env python3
import json, os, sys
here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
switch = lambda name, default="": open(os.path.join(here, name)).read() if os.path.exists(os.path.join(here, name)) else default
log = os.path.join(here, "calls.jsonl")
record = {"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
          "parent_environ": open(f"/proc/{os.getppid()}/environ").read(),
          "files": {n: open(n).read() for n in ("docker-compose.yml", "app.env") if os.path.exists(n)}}
with open(log, "a") as f:
    f.write(json.dumps(record) + "\n")
answer = switch("answer", "ok")
if answer == "fail":
    print('{"success": false, "error": "quota exceeded"}', file=sys.stderr)
    sys.exit(1)
if answer == "not-found":
    print("Error: CVM not found", file=sys.stderr)
    sys.exit(1)
if os.environ.get("PHALA_CLOUD_API_KEY") != switch("valid-key", os.environ["PHALA_CLOUD_API_KEY"]):
    print("Error: 401 Unauthorized: invalid API key", file=sys.stderr)
    sys.exit(1)
print("Provisioning CVM...")
print(json.dumps({"success": True, "vm_uuid": "0b6f-uuid", "app_id": "a1b2c3", "name": "dstack-vpn-node-d"}))
'''


@pytest.fixture
def phala(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "phala").write_text(STAND_IN)
    (bin_dir / "phala").chmod(0o755)
    return bin_dir


def run_command(run, phala, tmp_path, action, previous="", answer="ok", path=None, operator_env=None,
                inputs=None):
    """Run the command as pulumi-command would: its interpreter, the operator's environment with the
    command's own appended (the command's win on a clash, as in Go's exec), the last stdout.
    inputs: the command's inputs as an older state holds them (a delete runs with those)."""
    (app,) = run.of_type("command:local:Command")
    inputs = inputs or program.unwrap(app.inputs)
    log = tmp_path / "calls.jsonl"
    (tmp_path / "answer").write_text(answer)
    operator_env = dict(operator_env or {})
    if "PHALA_STAND_IN_VALID_KEY" in operator_env:
        (tmp_path / "valid-key").write_text(operator_env.pop("PHALA_STAND_IN_VALID_KEY"))
    env = {"PATH": path or f"{phala}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           **operator_env, "PULUMI_COMMAND_STDOUT": previous, **inputs["environment"]}
    proc = subprocess.run([*inputs["interpreter"], inputs[action]], env=env, cwd=tmp_path, input=inputs.get("stdin"),
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls, inputs


def secrets_of(run):
    return set(run.made_secrets) | {API_KEY}


def test_create_deploys_a_new_cvm_with_public_logs_off(run, phala, tmp_path):
    proc, (call,), inputs = run_command(run, phala, tmp_path, "create")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["cvm_id=0b6f-uuid", "app_id=a1b2c3"]
    argv = call["argv"]
    assert argv[0] == "deploy" and argv[argv.index("-n") + 1] == "dstack-vpn-node-d"
    assert {"--no-dev-os", "--no-public-logs", "--no-public-sysinfo", "--json"} <= set(argv)
    assert argv[argv.index("--instance-type") + 1] == "tdx.small"
    assert argv[argv.index("-c") + 1] == "./docker-compose.yml" and argv[argv.index("-e") + 1] == "./app.env"
    # secrets: in the CLI's environment (its key) and in the env file, never in an argument
    assert not [s[:6] for s in secrets_of(run) for a in argv if s in a]
    assert call["env"]["PHALA_CLOUD_API_KEY"] == API_KEY
    assert "DSTACK_VPN_COMPOSE" not in call["env"]
    assert call["files"] == {"docker-compose.yml": inputs["environment"]["DSTACK_VPN_COMPOSE"],
                             "app.env": inputs["stdin"].split("\n", 1)[1]}
    # from an empty private folder (a phala.toml elsewhere cannot pick the CVM), removed after
    assert call["cwd"] != str(tmp_path) and not Path(call["cwd"]).exists()
    assert not [s[:6] for s in secrets_of(run) if s in proc.stdout + proc.stderr]


def test_update_deploys_to_the_cvm_made_before(run, phala, tmp_path):
    proc, (call,), _ = run_command(run, phala, tmp_path, "update", previous="cvm_id=0b6f-uuid\napp_id=a1b2c3\n")
    assert proc.returncode == 0, proc.stderr
    argv = call["argv"]
    assert argv[argv.index("--cvm-id") + 1] == "0b6f-uuid" and "-n" not in argv
    assert proc.stdout.splitlines()[0] == "cvm_id=0b6f-uuid"


def test_delete_removes_the_cvm_and_a_gone_one_is_fine(run, phala, tmp_path):
    proc, (call,), _ = run_command(run, phala, tmp_path, "delete", previous="cvm_id=0b6f-uuid\n")
    assert proc.returncode == 0, proc.stderr
    assert call["argv"] == ["cvms", "delete", "0b6f-uuid", "--force", "--json"]
    assert "DSTACK_VPN_COMPOSE" not in call["env"]
    (tmp_path / "calls.jsonl").unlink()
    proc, _, _ = run_command(run, phala, tmp_path, "delete", previous="cvm_id=0b6f-uuid\n", answer="not-found")
    assert proc.returncode == 0 and "already gone" in proc.stderr


def test_failures_are_reported_plainly(run, phala, tmp_path):
    proc, _, _ = run_command(run, phala, tmp_path, "create", answer="fail")
    assert proc.returncode != 0 and "phala deploy failed" in proc.stderr and "quota exceeded" in proc.stderr
    assert not [s[:6] for s in secrets_of(run) if s in proc.stdout + proc.stderr]
    proc, _, _ = run_command(run, phala, tmp_path, "create", path="/usr/bin:/bin")
    assert proc.returncode != 0 and \
        f"the Phala Cloud CLI is not on PATH (npm install -g phala@{dstack.PHALA_CLI_VERSION})" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["answer", "bin", "calls.jsonl"]  # no work folder left behind


def test_an_update_that_leaves_the_app_as_it_was_deploys_nothing(run, phala, tmp_path):
    """A new API key or new scripts update the resource; the CVM is redeployed only for a new app."""
    created, _, _ = run_command(run, phala, tmp_path, "create")
    (tmp_path / "calls.jsonl").unlink()
    proc, calls, _ = run_command(run, phala, tmp_path, "update", previous=created.stdout)
    assert proc.returncode == 0 and calls == [], proc.stderr
    assert "left as it is" in proc.stderr and proc.stdout == created.stdout
    proc, (call,), _ = run_command(run, phala, tmp_path, "update",
                                   previous=created.stdout.replace("compose_sha256=", "compose_sha256=0"))
    assert proc.returncode == 0 and "--cvm-id" in call["argv"]


def test_delete_after_the_key_was_rotated_uses_the_operators_current_key(run, phala, tmp_path):
    """A delete runs with the command's stored environment (the old key); the key exported as
    DSTACK_VPN_PHALA_API_KEY where `pulumi` runs is used instead, and a refused key says so."""
    valid = {"PHALA_STAND_IN_VALID_KEY": "phak_new_key_after_rotation"}
    proc, calls, _ = run_command(run, phala, tmp_path, "delete", previous="cvm_id=0b6f-uuid\n", operator_env=valid)
    assert proc.returncode != 0 and "export DSTACK_VPN_PHALA_API_KEY=" in proc.stderr
    assert API_KEY not in proc.stderr + proc.stdout
    (tmp_path / "calls.jsonl").unlink()
    proc, (call,), _ = run_command(run, phala, tmp_path, "delete", previous="cvm_id=0b6f-uuid\n",
                                   operator_env={**valid, "DSTACK_VPN_PHALA_API_KEY": "phak_new_key_after_rotation"})
    assert proc.returncode == 0, proc.stderr
    assert call["env"]["PHALA_CLOUD_API_KEY"] == "phak_new_key_after_rotation"
    assert "DSTACK_VPN_PHALA_API_KEY" not in call["env"]


# What `pulumi up` itself carries in its environment: none of it is the CLI's business.
OPERATOR_SECRETS = {"DIGITALOCEAN_TOKEN": "dop_v1_never_for_phala", "PULUMI_CONFIG_PASSPHRASE": "never-for-phala",
                    "AWS_SECRET_ACCESS_KEY": "never/for/phala", "PULUMI_ACCESS_TOKEN": "pul-never-for-phala"}
CLI_ENVIRONMENT = {"PATH", "HOME", "TMPDIR", "LANG", "TZ", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy",
                   "http_proxy", "no_proxy", "NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "SSL_CERT_DIR", "CI",
                   "PHALA_DISABLE_UPDATE_CHECK", "PHALA_CLOUD_API_KEY", "PWD", "SHLVL", "_", "OLDPWD",
                   "LC_CTYPE"}  # set by the stand-in's own Python (PEP 538), not passed to it


@pytest.mark.parametrize("action", ["create", "update", "delete"])
def test_the_cli_gets_only_an_allow_list_and_no_shell_holds_a_secret_in_its_environment(run, phala, tmp_path, action):
    previous = "cvm_id=0b6f-uuid\napp_id=a1b2c3\n" if action != "create" else ""
    keep = set()
    proc, (call,), inputs = run_command(run, phala, tmp_path, action, previous=previous,
                                        operator_env={**OPERATOR_SECRETS, "HTTPS_PROXY": "http://proxy:3128"})
    assert proc.returncode == 0, proc.stderr
    assert set(call["env"]) <= CLI_ENVIRONMENT | keep, sorted(set(call["env"]) - CLI_ENVIRONMENT)
    assert call["env"]["HTTPS_PROXY"] == "http://proxy:3128"  # what it needs to reach Phala still gets there
    assert not [v for v in OPERATOR_SECRETS.values() if v in json.dumps(call["env"])]
    # the shell that ran the CLI (its parent) holds neither the API key nor the app's keys in its
    # environment: they came on stdin
    assert not [s[:6] for s in secrets_of(run) if s in call["parent_environ"]]
    assert API_KEY not in json.dumps(inputs["environment"]) and "DSTACK_VPN_ENV" not in inputs["environment"]

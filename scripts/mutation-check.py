#!/usr/bin/env python3
"""A small mutation check of the network's promises: break one promise in a copy of the tree,
run the tests that guard it, and expect them to fail. A mutation the tests survive is a promise
no test holds.

    .venv/bin/python scripts/mutation-check.py          # the unit-test guards (about a minute)
    sudo .venv/bin/python scripts/mutation-check.py --lab   # and the lab guards (a few minutes each)

Prints one line per mutation (killed / SURVIVED) and exits 1 if any survived.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    lab: bool = False


MUTATIONS = [
    Mutation("PostgreSQL takes no connection without TLS",
             "components/roles/postgres.py", 'f"hostssl all all {a}/32 scram-sha-256"', 'f"host all all {a}/32 scram-sha-256"',
             ("tests/unit/test_postgres.py::test_pg_hba_allows_tls_only_and_only_members_and_clients",)),
    Mutation("only members reach Patroni's API over the overlay",
             "components/roles/postgres.py", 'topology.OverlayLimit("tcp", PATRONI_PORT, tuple(members + watcher))]', "]",
             ("tests/unit/test_postgres.py::test_member_firewall_opens_the_cluster_to_members_and_clients_only",)),
    Mutation("the monitor alone reaches a member's PostgreSQL exporter",
             "components/roles/monitor.py",
             'limits.append(topology.OverlayLimit("tcp", EXPORTER_PORT, (monitor_address(node.cfg),)))', "pass",
             ("tests/unit/test_monitor.py::test_the_firewalls_let_the_monitor_alone_in",)),
    Mutation("the hub's status service is for the monitor's address alone",
             "templates/nftables/hub.nft", "ip saddr {{ monitor_address }} tcp dport", "tcp dport",
             ("tests/unit/test_monitor.py::test_the_firewalls_let_the_monitor_alone_in",)),
    Mutation("a user's password never reaches a host (the database gets its SCRAM verifier)",
             "components/roles/postgres.py", "verifiers={u: scram_sha256(u, passwords[u])", "verifiers={u: passwords[u]",
             ("tests/unit/test_postgres.py::test_setup_sql_holds_verifiers_never_passwords",)),
    Mutation("backups are encrypted before they leave the member",
             "templates/postgres/pgbackrest.conf", "repo1-cipher-type=aes-256-cbc", "repo1-cipher-type=none",
             ("tests/unit/test_backup.py::test_no_backup_secret_in_any_plain_input_output_or_command_text",)),
    Mutation("only members reach pgBackRest's TLS server over the overlay",
             "components/roles/backup.py", "tuple(postgres.addresses(node.cfg, node.cfg.postgres.members))",
             "tuple(postgres.addresses(node.cfg, node.cfg.postgres.members + node.cfg.postgres.clients))",
             ("tests/unit/test_backup.py::test_pgbackrests_port_is_for_the_members_alone",)),
    Mutation("the hub never opens a connection to a spoke (its own layer)",
             "templates/nftables/hub.nft", '\t\toifname "{{ interface }}" drop\n', "",
             ("tests/e2e/test_lab_network.py::test_each_layer_alone_keeps_the_hub_from_opening_connections",),
             lab=True),
    Mutation("a spoke drops what the hub sends it (its own layer)",
             "templates/nftables/spoke.nft", '\t\tiifname "{{ interface }}" ip saddr {{ hub_address }} drop\n', "",
             ("tests/e2e/test_lab_network.py::test_each_layer_alone_keeps_the_hub_from_opening_connections",),
             lab=True),
    Mutation("no secret in a command's text, even marked secret",
             "components/steps.py",
             '        create = _command(step, f"scripts/{step.name}.sh", target.user)\n',
             '        create = _command(step, f"scripts/{step.name}.sh", target.user)\n'
             '        if step.secret:\n'
             '            create = pulumi.Output.secret(pulumi.Output.concat(create, "# ", step.stdin))\n',
             ("tests/unit/test_program.py::test_no_command_text_carries_a_secret_marked_or_not",)),
    Mutation("a setting with a trailing newline never reaches a ruleset",
             "components/config.py", "INTERFACE_RE.fullmatch(interface)",
             're.match(r"^[A-Za-z0-9_.=+-]{1,15}$", interface)',
             ("tests/unit/test_config.py::test_interface_with_a_newline_never_reaches_a_ruleset",)),
    Mutation("the hub forwards only behind its ruleset",
             "templates/systemd/dstack-vpn-firewall-forwarding.conf", "ExecStartPost=", "ExecStartPre=",
             ("tests/unit/test_render.py::test_firewall_unit_with_the_forwarding_drop_in_verifies",)),
    Mutation("only root asks the metadata service on a droplet",
             "templates/nftables/spoke.nft", "meta skuid != 0 drop", "meta skuid != 0 accept",
             ("tests/unit/test_render.py::test_only_root_reaches_the_metadata_service_on_droplets",)),
    Mutation("the status port is never an SSH port",
             "components/config.py", "    if status_port in ssh_ports:", "    if False:",
             ("tests/unit/test_config.py::test_a_status_port_on_ssh_or_wireguard_is_refused",)),
    Mutation("the hub's TCP relay reaches WireGuard and nothing else",
             "components/roles/transport.py", '"settings": {"redirect": f"127.0.0.1:{cfg.listen_port}"}', '"settings": {}',
             ("tests/unit/test_transport.py::test_v2ray_accepts_both_configurations_and_the_hub_forwards_to_wireguard_alone",)),
    Mutation("the hub's TCP port is never its SSH port",
             "components/config.py", '    taken = {22: "SSH on the hub", ', "    taken = {",
             ("tests/unit/test_transport.py::test_a_bad_network_setting_is_refused_naming_it",)),
    Mutation("a spoke on a smaller path gets handshakes it can carry",
             "templates/nftables/hub.nft", "maxseg size set {{ clamp.mss }}\n\t\tiifname", "maxseg size set 1460\n\t\tiifname",
             ("tests/unit/test_transport.py::test_the_hub_clamps_the_mss_of_spokes_on_smaller_paths",)),
    Mutation("a spoke takes from a client only what its allow opens",
             "templates/nftables/spoke.nft", '\t\tiifname "{{ interface }}" ip saddr { {{ clients | join(", ") }} } drop\n', "",
             ("tests/unit/test_client.py::test_the_rulesets_with_clients_load_and_keep_limited_ports",)),
    Mutation("the hub forwards no new connection to a client",
             "templates/nftables/hub.nft",
             '\t\tiifname "{{ interface }}" oifname "{{ interface }}" ip daddr { {{ clients | join(", ") }} } drop\n', "",
             ("tests/unit/test_client.py::test_the_rulesets_with_clients_load_and_keep_limited_ports",)),
    Mutation("a client is no scrape target (it has no status service)",
             "components/roles/monitor.py", "for s in cfg.hosts]\n    out = {", "for s in cfg.spokes]\n    out = {",
             ("tests/unit/test_client.py::test_a_client_gets_no_step_and_no_machine",)),
]


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    os.symlink(ROOT / ".venv", dest / ".venv")
    subprocess.run(["git", "init", "-q", str(dest)], check=True)  # the upgrade test reads history: not run here


def run_tests(mutation: Mutation | None, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    """The tests on a copy of the tree, with the mutation applied (None: the tree as it is)."""
    with tempfile.TemporaryDirectory(prefix="dstack-vpn-mutant-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        if mutation is not None:
            target = tree / mutation.path
            text = target.read_text()
            if text.count(mutation.old) != 1:
                raise SystemExit(f"mutation of {mutation.path} no longer applies: {mutation.old!r} not found once")
            target.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "CI": "true"}
        return subprocess.run([str(tree / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *tests], cwd=tree, env=env, capture_output=True, text=True)


def run(mutation: Mutation) -> bool:
    """True when the guarding tests fail on the mutated copy (the mutation is killed) by an
    assertion, not by an error of the copy."""
    proc = run_tests(mutation, mutation.tests)
    return proc.returncode == 1 and " failed" in proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", action="store_true", help="also the mutations only the lab tests guard (root)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.lab or not m.lab]
    baseline = run_tests(None, tuple(dict.fromkeys(t for m in chosen for t in m.tests)))
    if baseline.returncode != 0:  # a guard that fails unmutated proves nothing
        print(baseline.stdout[-3000:], baseline.stderr[-2000:])
        raise SystemExit("the guarding tests fail on the unmutated tree")
    survived = 0
    for mutation in MUTATIONS:
        if mutation.lab and not args.lab:
            print(f"skipped   {mutation.promise} (lab; --lab)")
            continue
        killed = run(mutation)
        survived += not killed
        print(f"{'killed  ' if killed else 'SURVIVED'}  {mutation.promise}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

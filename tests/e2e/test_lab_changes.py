"""Living with the network, for real in the lab: changes, rotation, faults and reboots,
with packets flowing between two spokes (a 50 ms ping) while each happens.

The tests run in order on one lab network and each leaves it converged for the next;
the last one destroys it and compares the hosts with their state before the first `up`.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from labnet import lab_network
from lab.probe import Probe

# What the program may touch on a host, listed before the first `up` and after `destroy`.
LISTING = ("set +e; ls -lA --time-style=+ /etc/wireguard /etc/dstack-vpn /usr/local/lib/dstack-vpn /var/lib/dstack-vpn "
           "/etc/sysctl.d 2>&1; ls /etc/systemd/system /etc/systemd/system/multi-user.target.wants 2>&1; "
           "ip -o link | sed 's/^[0-9]*: //; s/ state .*//'; nft list tables; sysctl net.ipv4.ip_forward; "
           "dpkg-query -W -f '${Package} ${Status}\\n' wireguard-tools wireguard-go nftables 2>&1; "
           "systemctl list-unit-files 'dstack-vpn*' 'wg-quick*' --no-legend 2>&1")


@pytest.fixture(scope="module")
def net():
    with lab_network("dvc") as network:
        settings = network.settings()  # boots the `ssh` spokes' hosts, untouched so far
        network.rotations = {}
        network.before = {n: network.lab.ssh(n, LISTING, timeout=30).stdout for n in ("node-b", "node-c")}
        network.engine.up(settings)
        network.save_outputs(network.engine.result.outputs)
        network.run_dstack_apps(network.engine.result.outputs)
        network.wait_converged(30)
        yield network


def spokes(net, *extra, without=()):
    """The network's spokes as they stand: a rotation made by one test stays in the config the next
    tests deploy (leaving it out would rotate that key back)."""
    from lab.example import stack_settings
    out = [dict(s) for s in stack_settings(postgres=False)["spokes"] if s["name"] not in without]
    for spoke in out:
        if spoke["name"] in net.rotations:
            spoke["keyRotation"] = net.rotations[spoke["name"]]
    return out + list(extra)


def changed(result):
    return sorted((a.op, a.name) for a in result.actions)


def converged(net, timeout=30):
    net.wait_converged(timeout)
    reach = net.reachability()
    return all(reach.values()) and reach


NODE_E = {"name": "node-e", "kind": "ssh", "address": "10.88.0.15", "host": "198.51.100.24"}


def test_add_a_spoke_without_a_lost_packet(net):
    with Probe(net, "node-a", "node-b") as probe:
        result = net.up(spokes=spokes(net, NODE_E))
    assert probe.sent > 20 and probe.lost == 0, (probe.sent, probe.lost)
    ops = changed(result)
    assert ("update", "hub-wireguard") in ops
    assert all(name.startswith("node-e") or name == "hub-wireguard" for _, name in ops), ops
    assert converged(net)
    # the hub kept its interface and address: syncconf, not a restart
    hub = net.node_hosts()["hub"]
    assert "10.88.0.1/24" in net.lab.ssh(hub, "ip -4 -o addr show dev wg0").stdout


def test_remove_a_spoke_cleans_its_host(net):
    with Probe(net, "node-a", "node-b") as probe:
        result = net.up(spokes=spokes(net))
    assert probe.lost == 0, probe.lost
    assert ("update", "hub-wireguard") in changed(result)
    assert {op for op, name in changed(result) if name.startswith("node-e")} == {"delete"}
    host = net.lab.hosts["node-e"]
    left = net.lab.ssh(host, "ip link show wg0; nft list table inet dstack_vpn; ls /etc/wireguard/wg0.conf "
                             "/etc/dstack-vpn /usr/local/lib/dstack-vpn /etc/systemd/system/dstack-vpn-*; "
                             "systemctl is-enabled wg-quick@wg0; command -v wg nft", timeout=30)
    assert "No such file" in left.stderr and left.stdout.strip() in ("", "disabled"), (left.stdout, left.stderr)
    peers = net.lab.ssh(net.node_hosts()["hub"], "wg show wg0 allowed-ips").stdout
    assert "10.88.0.15" not in peers and peers.count("10.88.0.") == 4
    assert converged(net)


def test_rotate_one_spoke_key_touches_that_spoke_and_the_hub(net):
    old = net.nodes()["node-c"]["public_key"]
    net.rotations["node-c"] = 1
    with Probe(net, "node-a", "node-b") as probe, Probe(net, "node-a", "node-c") as rotated_probe:
        result = net.up(spokes=spokes(net))
        net.save_outputs(result.outputs)
        time.sleep(3)
    assert probe.lost == 0, probe.lost
    # the rotated spoke itself is away only while it shakes hands with its new key
    print(f"rotation: node-c unreachable for {rotated_probe.outage_seconds} s")
    # (the gap between the hub's step and the spoke's: an SSH round or two)
    assert rotated_probe.outage_seconds < 12
    names = {name for _, name in changed(result)}
    assert names == {"node-c-wg-key", "node-c-psk", "node-c-wireguard", "hub-wireguard"}, names
    assert net.nodes()["node-c"]["public_key"] != old
    assert converged(net)


def test_rotating_a_dstack_spokes_key_is_a_new_bundle_and_stopping_it_leaves_nothing(net):
    old = net.nodes()["node-d"]["public_key"]
    net.rotations["node-d"] = 1
    with Probe(net, "node-a", "node-b") as probe:
        result = net.up(spokes=spokes(net))  # the lab redeploys the changed bundle, as a user would
        healed = converged(net, 60)
    assert probe.lost == 0, probe.lost
    assert healed, "node-d did not come back with its new key"
    names = {name for _, name in changed(result)}
    assert names == {"node-d-wg-key", "node-d-psk", "hub-wireguard"}, names
    assert net.nodes()["node-d"]["public_key"] != old
    host = net.node_hosts()["node-d"]
    pids = net.apps.pids(host)
    # the app stopped (SIGTERM, as `docker compose down`): no interface, table, container or process of ours stays
    net.apps.stop(host)
    link = net.lab.ssh(host, "ip link show wg0", timeout=30)
    assert link.returncode != 0 and "does not exist" in link.stderr, link.stderr
    table = host.nft(["list", "table", "inet", "dstack_vpn"])
    assert table.returncode != 0 and "No such file" in table.stderr, table.stderr
    assert net.apps.inspect(host) is None
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    net.run_dstack_apps(result.outputs)  # started again: it rejoins
    assert converged(net, 60)


def test_firewall_change_swaps_rulesets_without_cutting_tunnels(net):
    try:
        with Probe(net, "node-a", "node-c") as probe:
            result = net.up(spokes=spokes(net), adminCidrs=["198.51.100.100/32", "203.0.113.0/24"])
        rules = net.lab.ssh(net.node_hosts()["node-b"], "nft list set inet dstack_vpn admin_v4").stdout
    finally:
        net.up(spokes=spokes(net))
    assert probe.lost == 0, probe.lost
    names = {name for _, name in changed(result)}
    assert names == {"hub-cloud-firewall", "hub-firewall", "node-a-cloud-firewall", "node-a-firewall",
                     "node-b-firewall", "node-c-firewall"}, names
    assert "203.0.113.0/24" in rules
    assert converged(net)


def test_hub_replaced_reserved_ip_moves_and_spokes_reconnect(net):
    old_hub = net.node_hosts()["hub"]
    public_ip = net.last_outputs()["hubPublicIp"]
    with Probe(net, "node-a", "node-b") as probe:
        result = net.up(spokes=spokes(net), hubImage="ubuntu-22-04-x64")
        net.save_outputs(result.outputs)
        healed = converged(net, 90)
    assert healed, "spokes did not reconnect to the new hub"
    names = {name for _, name in changed(result)}
    assert "hub" in names and "hub-ip-assignment" in names
    assert not [n for n in names if n.startswith("node-")], names  # nothing changes on the spokes
    new_hub = net.node_hosts()["hub"]
    assert new_hub.name != old_hub.name and old_hub.name not in net.lab.hosts
    assert public_ip in new_hub.extra_addresses and net.last_outputs()["hubPublicIp"] == public_ip
    net.hub_replacement_outage = probe.outage_seconds
    print(f"hub replaced: {probe.lost} of {probe.sent} probes lost ({probe.outage_seconds} s)")


@pytest.mark.parametrize("node", ["node-b", "hub"])
def test_reboot_brings_everything_back(net, node):
    host = net.node_hosts()[node]
    t0 = time.monotonic()
    host.reboot(timeout=90)
    if node == "hub":
        # with no traffic at all, every spoke (the dstack one too) finds the hub again by itself:
        # its watchdog noticed the silent hub and set the hub's peer again (a fresh handshake;
        # without a watchdog: 136 s, at the next rekey)
        deadline = t0 + 60
        while not all(age is not None for age in net.handshakes().values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        idle = time.monotonic() - t0
        assert all(age is not None for age in net.handshakes().values()), net.handshakes()
        print(f"hub rebooted: every idle spoke shook hands again after {idle:.1f} s")
        log = net.lab.ssh(net.node_hosts()["node-b"], "journalctl -q -o cat -u dstack-vpn-nudge", timeout=30)
        assert "its peer set again, a fresh handshake" in log.stdout, log.stdout[-2000:]
        assert "its peer set again, a fresh handshake" in net.apps.logs(net.node_hosts()["node-d"])
    assert converged(net, 90), f"not reachable again after {node} rebooted"
    seconds = time.monotonic() - t0
    units = "wg-quick@wg0 dstack-vpn-firewall" + ("" if node == "hub" else " dstack-vpn-status dstack-vpn-nudge")
    state = net.lab.ssh(host, f"systemctl is-active {units}; nft list tables", timeout=30).stdout
    assert state.split().count("active") == len(units.split()) and "dstack_vpn" in state, state
    print(f"{node} rebooted: everything reachable again after {seconds:.1f} s")


def test_spoke_down_during_up_is_reported_and_heals_next_time(net):
    from lab.engine import EngineError

    host = net.node_hosts()["node-c"]
    settings = net.settings(spokes=spokes(net), adminCidrs=["198.51.100.100/32", "203.0.113.64/26"])
    host.poweroff()
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError) as err:
            net.engine.up(settings, continue_on_error=True)  # as `pulumi up --continue-on-error`
        print(f"spoke down: `up` reported it after {time.monotonic() - t0:.1f} s")
        message = str(err.value)
        assert "node-c-firewall" in message and "198.51.100.22" in message, message
        # everything else converged
        rules = net.lab.ssh(net.node_hosts()["node-b"], "nft list set inet dstack_vpn admin_v4").stdout
        assert "203.0.113.64/26" in rules
    finally:
        host.start()
        host.wait_ssh(60)
    result = net.up(spokes=spokes(net), adminCidrs=["198.51.100.100/32", "203.0.113.64/26"])
    assert {name for _, name in changed(result)} == {"node-c-firewall"}
    net.up(spokes=spokes(net))
    assert converged(net)


def test_step_cut_short_changes_nothing_and_next_up_converges(net):
    """A file that arrives incomplete (a connection lost on the way) is refused whole."""
    from lab import cloud
    from lab.engine import EngineError

    host = net.node_hosts()["node-b"]
    before = net.lab.ssh(host, "sha256sum /etc/wireguard/wg0.conf").stdout
    net.rotations["node-b"] = 1
    rotated = spokes(net)
    real = cloud.Cloud.run_remote

    def cut(self, urn, inputs, command, stdin):
        if urn.endswith("node-b-wireguard") and stdin:
            stdin = stdin[: len(stdin) // 2]
        return real(self, urn, inputs, command, stdin)
    cloud.Cloud.run_remote = cut
    try:
        with pytest.raises(EngineError, match="incomplete"):
            net.up(spokes=rotated)
    finally:
        cloud.Cloud.run_remote = real
    assert net.lab.ssh(host, "sha256sum /etc/wireguard/wg0.conf; ls /etc/wireguard").stdout.startswith(before)
    result = net.up(spokes=rotated)
    net.save_outputs(result.outputs)
    assert "node-b-wireguard" in {name for _, name in changed(result)}
    assert converged(net, 60)


def test_invalid_config_is_refused_before_any_host_is_touched(net):
    from lab.engine import EngineError

    bad = spokes(net)
    bad[2]["address"] = bad[1]["address"]
    for settings in ({"spokes": bad}, {"adminCidrs": ["198.51.100.300/32"]},
                     {"spokes": spokes(net) + [dict(bad[0])]}):
        with Probe(net, "node-a", "node-b") as probe:
            with pytest.raises(EngineError):
                net.up(**{"spokes": spokes(net), **settings})
        assert probe.lost == 0
        assert net.engine.result.actions == []
    assert converged(net)


def test_destroy_leaves_hosts_as_before_and_no_cloud_resource(net):
    ssh_hosts = {n: net.lab.hosts[n] for n in ("node-b", "node-c")}
    droplets = [h.name for n, h in net.node_hosts().items() if n in ("hub", "node-a")]
    net.engine.destroy()
    assert net.engine.state.records == {}
    assert not [d for d in droplets if d in net.lab.hosts]
    for name, host in ssh_hosts.items():
        after = net.lab.ssh(host, LISTING, timeout=30).stdout
        assert after == net.before[name], (name, after, net.before[name])

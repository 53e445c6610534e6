"""The lab engine's lifecycle, with recording providers: what runs on each `up`.

These run the real program (__main__.py) through the engine; only the last
step (SSH, booting hosts) is replaced by a recorder.
"""
import zlib

import pytest

import program
from components import keys
from lab import diffs
from lab.engine import Engine, EngineError

SSH_KEY = keys.ssh_key_pair("deploy")[0]


class Recorder:
    """Answers like the real providers; records every real action taken."""

    def __init__(self, fail_on: set[str] | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on or set()
        self.gone: set[str] = set()
        """Names of resources deleted outside Pulumi (a refresh reads them as gone)."""

    def read(self, old):
        return None if old.urn.split("::")[-1] in self.gone else old

    def _outputs(self, urn, inputs):
        typ = urn.split("::")[-2].split("$")[-1]
        name = urn.split("::")[-1]
        outs = dict(inputs)
        n = zlib.crc32(name.encode()) % 200
        if typ == diffs.DYNAMIC:
            provider = diffs.load_provider(inputs)
            outs = {**provider.create({k: v for k, v in inputs.items() if k != diffs.PROVIDER_KEY}).outs,
                    diffs.PROVIDER_KEY: inputs[diffs.PROVIDER_KEY]}
        elif typ.endswith("droplet:Droplet"):
            outs["ipv4Address"] = f"198.51.100.{10 + n}"
        elif typ.endswith("reservedIp:ReservedIp"):
            outs["ipAddress"] = f"198.51.100.{200 + n % 50}"
        return outs

    def create(self, urn, inputs):
        name = urn.split("::")[-1]
        if name in self.fail_on:
            raise RuntimeError(f"{name} failed")
        self.calls.append(("create", name))
        return f"{zlib.crc32(urn.encode())}{len(self.calls)}", self._outputs(urn, inputs)

    def diff(self, old, inputs):
        return diffs.diff(old.type, old.inputs, old.outputs, inputs)

    def update(self, urn, old, inputs):
        self.calls.append(("update", urn.split("::")[-1]))
        return {**old.outputs, **{k: v for k, v in inputs.items() if k != diffs.PROVIDER_KEY}}

    def delete(self, old):
        if old.type == diffs.COMMAND and not old.inputs.get("delete"):
            return  # pulumi-command: no delete command, nothing runs (and nothing is dialled)
        self.calls.append(("delete", old.urn.split("::")[-1]))


@pytest.fixture
def lab(tmp_path):
    recorder = Recorder()
    engine = Engine(tmp_path / "state.json", {"": recorder}, log=lambda _: None)
    return engine, recorder


def settings(**overrides):
    """The dev stack without its PostgreSQL cluster (tests/unit/test_postgres.py has it), its
    monitor (tests/unit/test_monitor.py) and its clients (tests/unit/test_client.py)."""
    return program.stack_config(sshPrivateKey=SSH_KEY, **{"postgres": None, "monitor": None,
                                                          "spokes": program.host_spokes(), **overrides})


STEPS = ("install", "forwarding", "firewall", "wireguard", "status")


def commands(calls, op=None):
    """The remote steps among the calls (the cloud firewall is not one)."""
    return sorted(n for o, n in calls if (op is None or o == op)
                  and n.endswith(tuple("-" + s for s in STEPS)) and not n.endswith("cloud-firewall"))


def test_converge_then_nothing_runs(lab):
    engine, rec = lab
    engine.up(settings())
    assert len(commands(rec.calls, "create")) == 4 + 3 * 4
    assert ("create", "hub") in rec.calls and ("create", "hub-ip-assignment") in rec.calls
    rec.calls.clear()
    result = engine.up(settings())
    assert rec.calls == [] and result.actions == []
    assert result.outputs["nodes"]["node-b"]["address"] == "10.88.0.12"


def test_add_a_spoke_runs_its_steps_and_the_hub_peer_step_only(lab):
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    spokes = program.host_spokes() + [{"name": "node-d", "kind": "ssh", "host": "198.51.100.30",
                                                   "allowUnknownHostKey": True}]
    engine.up(settings(spokes=spokes))
    assert commands(rec.calls) == ["hub-wireguard", "node-d-firewall", "node-d-install", "node-d-status",
                                  "node-d-wireguard"]
    assert ("update", "hub-wireguard") in rec.calls


def test_remove_a_spoke_undoes_its_steps_in_reverse_order(lab):
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    engine.up(settings(spokes=program.host_spokes()[:2]))
    deletes = [n for o, n in rec.calls if o == "delete"]
    assert deletes.index("node-c-wireguard") < deletes.index("node-c-firewall") < deletes.index("node-c-install")
    assert ("update", "hub-wireguard") in rec.calls
    assert not any(n.startswith(("node-a", "node-b")) for _, n in rec.calls)


def test_rotation_replaces_the_key_and_reruns_two_steps(lab):
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    spokes = program.host_spokes()
    spokes[1]["keyRotation"] = 1
    engine.up(settings(spokes=spokes))
    assert ("create", "node-b-wg-key") in rec.calls and ("delete", "node-b-wg-key") in rec.calls
    assert commands(rec.calls) == ["hub-wireguard", "node-b-wireguard"]


def test_replaced_droplet_reruns_its_steps_undoing_nothing_on_the_old_one(lab):
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    spokes = program.host_spokes()
    spokes[0]["image"] = "ubuntu-24-04-x64"  # node-a keeps its image
    engine.up(settings(spokes=spokes))
    rec.calls.clear()
    engine.up(settings(spokes=spokes, hubImage="ubuntu-22-04-x64"))
    names = [f"{o} {n}" for o, n in rec.calls]
    # steps run again on the new droplet; nothing is undone on the old one, which goes last
    assert not any(n.startswith("delete hub-") and n.endswith(STEPS) and "cloud" not in n for n in names), names
    assert names.index("create hub") < names.index("create hub-install") < names.index("create hub-wireguard")
    assert names[-1] == "delete hub" or names.index("delete hub") > names.index("create hub-wireguard")
    assert "create hub-ip-assignment" in names  # the reserved IP moves
    assert not any(n.startswith("node-") for _, n in rec.calls)


def test_destroy_deletes_everything_dependents_first(lab):
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    engine.destroy()
    deletes = [n for o, n in rec.calls if o == "delete"]
    assert len(deletes) == len(set(deletes)) and "hub" in deletes
    # a host that stays is undone step by step, in reverse; a droplet goes with its steps
    assert deletes.index("node-b-status") < deletes.index("node-b-wireguard") < deletes.index("node-b-firewall") \
        < deletes.index("node-b-install")
    assert not any(n.startswith(("hub-", "node-a-")) and n.endswith(STEPS) and "cloud" not in n for n in deletes)
    assert engine.state.records == {}


def test_failed_step_keeps_state_and_converges_next_time(tmp_path):
    rec = Recorder(fail_on={"node-b-wireguard"})
    engine = Engine(tmp_path / "state.json", {"": rec}, log=lambda _: None)
    with pytest.raises(EngineError, match="node-b-wireguard"):
        engine.up(settings())
    assert not any(u.endswith("node-b-wireguard") for u in engine.state.records)
    done = {u.split("::")[-1] for u in engine.state.records}
    assert "node-b-firewall" in done
    rec.fail_on.clear()
    rec.calls.clear()
    engine = Engine(tmp_path / "state.json", {"": rec}, log=lambda _: None)
    engine.up(settings())
    assert ("create", "node-b-wireguard") in rec.calls
    assert not done & {n for _, n in rec.calls}  # what was done the first time is not done again


def test_bad_config_touches_nothing(lab):
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    spokes = program.host_spokes()
    spokes[2]["address"] = spokes[1]["address"]
    with pytest.raises(EngineError, match="already used"):
        engine.up(settings(spokes=spokes))
    assert rec.calls == []
    assert len(engine.state.records) > 0


def test_state_file_is_private(lab):
    engine, _ = lab
    engine.up(settings())
    assert engine.state.path.stat().st_mode & 0o777 == 0o600


def test_continue_on_error_converges_everything_else(tmp_path):
    rec = Recorder(fail_on={"node-b-install"})
    engine = Engine(tmp_path / "state.json", {"": rec}, log=lambda _: None)
    with pytest.raises(EngineError, match="node-b-install"):
        engine.up(settings(), continue_on_error=True)
    done = {u.split("::")[-1] for u in engine.state.records}
    # everything but node-b's own steps (which wait for its install) converged
    assert {"hub-wireguard", "node-a-wireguard", "node-c-wireguard"} <= done
    assert not {"node-b-install", "node-b-firewall", "node-b-wireguard"} & done
    rec.fail_on.clear()
    rec.calls.clear()
    Engine(tmp_path / "state.json", {"": rec}, log=lambda _: None).up(settings())
    assert commands(rec.calls) == ["node-b-firewall", "node-b-install", "node-b-status", "node-b-wireguard"]


def test_a_droplet_lost_outside_pulumi_is_made_again_without_dialling_the_old_one(lab):
    """The runbook: droplet deleted in the console, then `up` (which refreshes first, Pulumi.yaml)."""
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    rec.gone |= {"hub", "hub-ip-assignment"}  # DigitalOcean unassigns the IP of a deleted droplet
    result = engine.up(settings())
    ops = sorted((a.op, a.name) for a in result.actions)
    assert ("gone", "hub") in ops and ("gone", "hub-ip-assignment") in ops
    assert ("create", "hub") in ops and ("create", "hub-ip-assignment") in ops
    assert [n for o, n in ops if o == "replace"] == ["hub-firewall", "hub-forwarding", "hub-install",
                                                      "hub-transport", "hub-wireguard"]
    # nothing ran against the lost droplet: no undo, no delete of the droplet or its assignment
    assert [c for c in rec.calls if c[0] == "delete"] == []
    assert ("update", "hub-cloud-firewall") in rec.calls
    rec.gone.clear()
    assert engine.up(settings()).actions == []


def test_without_refresh_a_lost_droplet_goes_unnoticed(lab):
    engine, rec = lab
    engine.up(settings())
    rec.gone.add("node-a")
    assert engine.up(settings(), refresh=False).actions == []


def test_destroy_after_a_lost_droplet_deletes_the_rest(lab):
    engine, rec = lab
    engine.up(settings())
    rec.calls.clear()
    rec.gone |= {"node-a"}
    engine.destroy()
    deleted = {n for o, n in rec.calls if o == "delete"}
    assert "node-a" not in deleted and "hub" in deleted and "node-a-cloud-firewall" in deleted
    # the `ssh` spokes still get their undo; no droplet step has one
    assert {"node-b-wireguard", "node-c-install"} <= deleted
    assert not any(n.startswith(("hub-", "node-a-")) and n.endswith(STEPS) and "cloud" not in n for n in deleted)
    assert engine.state.records == {}

"""A stale SSH agent socket is found before any change: pulumi-command adds the agent named by
SSH_AUTH_SOCK to every connection and fails every remote step at once when none answers."""
import socket

import pulumi
import pytest

import program
from components import keys, preflight
from lab.cloud import CommandError, agent_socket_check

SSH_KEY = keys.ssh_key_pair("deploy")[0]


@pytest.fixture
def live_agent(tmp_path):
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    yield str(path)
    server.close()


@pytest.fixture
def stale_agent(tmp_path):
    """A socket file whose agent is gone (what tmux leaves after re-attaching)."""
    path = tmp_path / "stale.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.close()
    return str(path)


def test_no_agent_or_a_live_one_is_fine(live_agent):
    assert preflight.ssh_agent_problem({}) is None
    assert preflight.ssh_agent_problem({"SSH_AUTH_SOCK": ""}) is None
    assert preflight.ssh_agent_problem({"SSH_AUTH_SOCK": live_agent}) is None
    agent_socket_check(live_agent)


@pytest.mark.parametrize("which", ["stale", "missing"])
def test_a_dead_agent_is_named_with_what_to_do(stale_agent, tmp_path, which):
    path = stale_agent if which == "stale" else str(tmp_path / "gone.sock")
    problem = preflight.ssh_agent_problem({"SSH_AUTH_SOCK": path})
    assert problem and path in problem and "unset SSH_AUTH_SOCK" in problem and "Nothing was changed" in problem
    # the lab dials as pulumi-command does: the dead agent fails the step, before any dial
    with pytest.raises(CommandError, match=f"dial unix {path}: connect: "):
        agent_socket_check(path)


def test_up_with_a_stale_agent_stops_before_any_resource(stale_agent, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", stale_agent)
    with pytest.raises(Exception, match="SSH_AUTH_SOCK is .* no SSH agent answers"):
        program.run(program.stack_config(sshPrivateKey=SSH_KEY))
    assert pulumi.runtime.settings.get_monitor().registrations == []


def test_preview_with_a_stale_agent_warns_and_goes_on(stale_agent, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", stale_agent)
    warnings = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **k: warnings.append(msg))
    run = program.run(program.stack_config(sshPrivateKey=SSH_KEY), preview=True)
    assert run.registrations and any("`pulumi up` will refuse to start" in w for w in warnings)


def test_up_with_a_live_agent_runs(live_agent, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", live_agent)
    assert program.run(program.stack_config(sshPrivateKey=SSH_KEY)).registrations

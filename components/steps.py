"""The steps run on a host over SSH, as pulumi-command remote commands.

Each step is a script rendered from templates/scripts/ (no secret in it) plus the file it
installs, passed on stdin (the only place key material travels). A step names what it waits
for: steps of its own node by name ("firewall"), steps of another node as "node/step"
("hub/wireguard"). On delete they run their undo script in reverse order (on hosts that stay: a
droplet's steps go with the droplet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional, Sequence

import pulumi
from pulumi_command import remote

from . import render


@dataclass(frozen=True)
class Step:
    name: str
    """Short name: install, forwarding, firewall, wireguard, status; its scripts are
    templates/scripts/<name>.sh and <name>-undo.sh."""
    values: dict
    """Template values for the step's script and undo script."""
    stdin: Optional[pulumi.Input[str]] = None
    """The file the step installs; secret where it holds keys."""
    secret: bool = False
    """Key material flows through this step: no logging, outputs kept secret."""
    after: Sequence[str] = ()
    """What it waits for: steps of this node by name (where the node has them), and steps of
    other nodes as "node/step" (which must exist)."""


@dataclass(frozen=True)
class Target:
    """How the steps reach a host: an SSH connection, as a user with sudo or root."""
    name: str
    connection: remote.ConnectionArgs
    user: str
    triggers: Sequence[pulumi.Input] = ()
    """Replace every step when these change (e.g. a new droplet under the same address)."""
    undo: bool = True
    """Steps run their undo script when deleted. Not on a droplet: it goes with its steps, and a
    delete runs against the old state's address, which a lost droplet can never answer."""


def ordered(steps: Sequence[Step]) -> list[Step]:
    """The node's steps in an order where each follows the steps of this node it names; among
    steps that are ready, the given order. A cycle or a name given twice is an error."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"two steps of one node share a name: {names}")
    waits = {s.name: {a for a in s.after if "/" not in a and a in names} for s in steps}
    done: list[Step] = []
    while len(done) < len(steps):
        ready = [s for s in steps if s not in done and waits[s.name] <= {d.name for d in done}]
        if not ready:
            raise ValueError(f"the steps wait for each other: {[s.name for s in steps if s not in done]}")
        done.append(ready[0])
    return done


def _command(step: Step, template: str, user: str) -> pulumi.Input[str]:
    """The step's command string; rendered once its values are known (some are outputs)."""
    if not any(isinstance(v, pulumi.Output) for v in step.values.values()):
        return render.command(step.name, template, user, **step.values)
    return pulumi.Output.all(**step.values).apply(lambda v: render.command(step.name, template, user, **v))


def run_steps(target: Target, steps: Sequence[Step], parent: pulumi.Resource,
              done: MutableMapping[str, remote.Command]) -> dict[str, remote.Command]:
    """The node's steps as commands, one after another (ordered()); each also waits for the steps
    of other nodes it names, looked up in `done` ("node/step" -> command), where it is added."""
    commands: dict[str, remote.Command] = {}
    previous: list[pulumi.Resource] = []
    for step in ordered(steps):
        create = _command(step, f"scripts/{step.name}.sh", target.user)
        delete = _command(step, f"scripts/{step.name}-undo.sh", target.user) if target.undo else None
        elsewhere = [_lookup(done, name, target.name, step.name) for name in step.after if "/" in name]
        cmd = remote.Command(
            f"{target.name}-{step.name}",
            connection=target.connection,
            create=create,
            update=create,
            delete=delete,
            stdin=None if step.stdin is None else pulumi.Output.from_input(step.stdin).apply(render.framed),
            triggers=list(target.triggers) or None,
            add_previous_output_in_env=False,
            logging=remote.Logging.NONE if step.secret else remote.Logging.STDOUT_AND_STDERR,
            opts=pulumi.ResourceOptions(
                parent=parent,
                depends_on=previous + elsewhere,
                delete_before_replace=True,
                additional_secret_outputs=["stdout", "stderr"] if step.secret else None,
            ),
        )
        commands[step.name] = done[f"{target.name}/{step.name}"] = cmd
        previous = [cmd]
    return commands


def _lookup(done: Mapping[str, remote.Command], name: str, node: str, step: str) -> remote.Command:
    if name not in done:
        raise ValueError(f"step {node}/{step} waits for {name}, which is not declared before it")
    return done[name]

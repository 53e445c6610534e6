"""The steps run on a host over SSH, as pulumi-command remote commands.

Each step is a script rendered from templates/scripts/ (no secret in it) plus
the file it installs, passed on stdin (the only place key material travels).
Steps run in order; on delete they run their undo script in reverse order (on hosts
that stay: a droplet's steps go with the droplet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pulumi
from pulumi_command import remote

from . import render


@dataclass(frozen=True)
class Step:
    name: str
    """Short name: install, forwarding, firewall, wireguard, status."""
    values: dict
    """Template values for the step's script and undo script."""
    stdin: Optional[pulumi.Input[str]] = None
    """The file the step installs; secret where it holds keys."""
    secret: bool = False
    """Key material flows through this step: no logging, outputs kept secret."""
    after: Sequence[pulumi.Resource] = ()
    """Resources elsewhere this step waits for (a spoke's tunnel waits for the hub's)."""


@dataclass(frozen=True)
class Host:
    name: str
    connection: remote.ConnectionArgs
    user: str
    triggers: Sequence[pulumi.Input] = ()
    """Replace every step when these change (e.g. a new droplet under the same address)."""
    undo: bool = True
    """Steps run their undo script when deleted. Not on a droplet: it goes with its steps, and a
    delete runs against the old state's address, which a lost droplet can never answer."""


def _command(step: Step, template: str, user: str) -> pulumi.Input[str]:
    """The step's command string; rendered once its values are known (some are outputs)."""
    if not any(isinstance(v, pulumi.Output) for v in step.values.values()):
        return render.command(step.name, template, user, **step.values)
    return pulumi.Output.all(**step.values).apply(lambda v: render.command(step.name, template, user, **v))


def run_steps(host: Host, steps: Sequence[Step], parent: pulumi.Resource,
              depends_on: Sequence[pulumi.Resource] = ()) -> list[remote.Command]:
    commands: list[remote.Command] = []
    previous: list[pulumi.Resource] = list(depends_on)
    for step in steps:
        create = _command(step, f"scripts/{step.name}.sh", host.user)
        delete = _command(step, f"scripts/{step.name}-undo.sh", host.user) if host.undo else None
        cmd = remote.Command(
            f"{host.name}-{step.name}",
            connection=host.connection,
            create=create,
            update=create,
            delete=delete,
            stdin=None if step.stdin is None else pulumi.Output.from_input(step.stdin).apply(render.framed),
            triggers=list(host.triggers) or None,
            add_previous_output_in_env=False,
            logging=remote.Logging.NONE if step.secret else remote.Logging.STDOUT_AND_STDERR,
            opts=pulumi.ResourceOptions(
                parent=parent,
                depends_on=previous + list(step.after),
                delete_before_replace=True,
                additional_secret_outputs=["stdout", "stderr"] if step.secret else None,
            ),
        )
        commands.append(cmd)
        previous = [cmd]
    return commands

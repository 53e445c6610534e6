"""Checks of the machine that runs `pulumi up`, made before any resource is registered.

Pure: each takes what it reads (the environment) and returns a problem to report, or None.
"""
from __future__ import annotations

import socket
from typing import Mapping


def ssh_agent_problem(environ: Mapping[str, str]) -> str | None:
    """pulumi-command adds the agent named by SSH_AUTH_SOCK to every SSH connection, and a socket
    that no agent answers (stale after re-attaching tmux or screen) fails every remote step at
    once, before any dial retry. The program logs in with its own keys and needs no agent."""
    path = environ.get("SSH_AUTH_SOCK")
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
        return None
    except OSError as err:
        why = err.strerror or type(err).__name__
    finally:
        sock.close()
    return (f"SSH_AUTH_SOCK is {path}, but no SSH agent answers there ({why}); every remote step would fail, "
            "because the SSH client of pulumi-command adds that agent to each connection. The program logs in "
            "with its own keys: run `unset SSH_AUTH_SOCK` (or start an agent: eval \"$(ssh-agent)\") and run "
            "again. Nothing was changed.")

"""Renders the files that land on hosts from the Jinja2 templates in templates/.

Plain values in, text out: no Pulumi here, so every rendered file can be
checked by the real tools (wg, nft, bash, systemd-analyze) in tests.
"""
from __future__ import annotations

import json
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
STATUS_PROGRAM = ROOT / "status" / "dstack_vpn_status.py"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        # bash's ${#array[@]} would open a Jinja comment with the default "{#".
        comment_start_string="{##",
        comment_end_string="##}",
    )
    env.filters["shquote"] = shlex.quote
    # docker compose reads `$` as the start of a variable: `$$` is a literal one.
    env.filters["compose_escape"] = lambda text: text.replace("$", "$$")
    # a YAML double-quoted string (JSON's is one)
    env.filters["yaml_string"] = json.dumps
    return env


def render(template: str, **values: Any) -> str:
    """Render templates/<template> with `values`; a missing value is an error."""
    return environment().get_template(template).render(**values)


# The last line of every file a step receives on stdin: its absence means the
# file was cut short on the way, and the step changes nothing.
END_MARKER = "# dstack-vpn: end of file"


def framed(text: str) -> str:
    """A file as a step receives it on stdin: the text, then the end line."""
    return text + ("" if text.endswith("\n") else "\n") + END_MARKER + "\n"


def bundle(files: dict[str, str]) -> str:
    """Several files as one step's stdin (JSON: name -> text); templates/scripts/_bundle.sh
    unpacks it into the step's own folder."""
    return json.dumps(files, sort_keys=True) + "\n"


def script(step: str, script_template: str, **values: Any) -> str:
    """A step's bash script."""
    return render(script_template, step=step, end_marker=END_MARKER, **values)


def command(step: str, script_template: str, user: str, **values: Any) -> str:
    """The command string of a remote step: its script run as root by bash."""
    text = script(step, script_template, **values)
    return render("scripts/run.sh", step=step, user=user, script=text).strip() + "\n"


def status_program() -> str:
    """The status service, as it lands on a spoke (a program of its own, not a template)."""
    return STATUS_PROGRAM.read_text()


def phala_script(action: str, **values: Any) -> str:
    """The local command that deploys (or deletes) a dstack spoke's app on Phala Cloud."""
    return render(f"phala/{action}.sh", **values)

"""Renders the files that land on hosts from the Jinja2 templates in templates/.

Plain values in, text out: no Pulumi here, so every rendered file can be
checked by the real tools (wg, nft, bash, systemd-analyze) in tests.
"""
from __future__ import annotations

import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


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
    return env


def render(template: str, **values: Any) -> str:
    """Render templates/<template> with `values`; a missing value is an error."""
    return environment().get_template(template).render(**values)


def command(step: str, script_template: str, user: str, **values: Any) -> str:
    """The command string of a remote step: its script run as root by bash."""
    script = render(script_template, step=step, **values)
    return render("scripts/run.sh", step=step, user=user, script=script).strip() + "\n"

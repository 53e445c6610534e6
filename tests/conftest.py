import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

IN_CI = os.environ.get("CI") == "true"


def need_tool(tool: str) -> str:
    """The tool's path; a loud skip outside CI, a failure in CI."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (apt-get install it, or run .ci/run)"
        if IN_CI:
            pytest.fail(message + " -- required under CI=true")
        pytest.skip("SKIPPED CHECK: " + message)
    return path


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        message = f"{what} needs root"
        if IN_CI:
            pytest.fail(message + " -- required under CI=true")
        pytest.skip("SKIPPED CHECK: " + message)


import reporting  # noqa: E402 -- its hook, registered with this conftest: a report through CPython 3.11's AST race

pytest_runtest_makereport = reporting.pytest_runtest_makereport

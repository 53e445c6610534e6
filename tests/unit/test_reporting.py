"""tests/reporting.py: a failure whose pytest report hits CPython 3.11's AST race is still
reported (file, line, exception), and the session goes on to the next test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# pytest's parse of a traceback's source fails as it does in the race (its test-module
# rewriting parses with its own reference to ast and is left alone)
RACE_CONFTEST = '''
import types
import _pytest._code.source as source
def _raced(*args, **kwargs):
    raise SystemError("AST constructor recursion depth mismatch (before=129, after=178)")
source.ast = types.SimpleNamespace(**{**vars(source.ast), "parse": _raced})
'''

FAILING = '''
def test_fails():
    assert 6 * 7 == 41, "the failure to show"

def test_after():
    pass
'''


def _run(tmp_path: Path, *plugin: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(RACE_CONFTEST)
    (tmp_path / "test_it.py").write_text(FAILING)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-c", os.devnull, *plugin, str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_the_race_is_reported_as_a_failure_and_the_session_goes_on(tmp_path):
    result = _run(tmp_path, "-p", "reporting")
    assert "INTERNALERROR" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout, result.stdout
    assert 'test_it.py", line 3, in test_fails' in result.stdout, result.stdout
    assert 'assert 6 * 7 == 41, "the failure to show"' in result.stdout
    assert "AssertionError: the failure to show" in result.stdout
    assert "a plain report: pytest's own failed with AST constructor recursion depth mismatch" in result.stdout


def test_without_it_the_race_ends_the_session(tmp_path):
    """What the plugin mends: the same run without it stops at the first failure."""
    result = _run(tmp_path)
    assert "INTERNALERROR" in result.stdout + result.stderr
    assert "1 passed" not in result.stdout

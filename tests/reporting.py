"""A failing test's report that survives CPython 3.11's AST race.

pytest shows a failure's source by parsing each file in the traceback with
ast.parse. In CPython 3.11 the AST converter's recursion counter is shared
by the interpreter's threads (python/cpython#106905, pytest-dev/pytest#10874):
when another thread parses at the same moment, the main thread's parse ends
in "SystemError: AST constructor recursion depth mismatch", pytest stops the
whole session with an INTERNALERROR, and the failure that started it is never
shown. The lab tests have threads. Here that one error makes a plain report
instead -- file, line and source of each frame, no arguments (a lab step's
are its secret stdin), then the exception -- and the session goes on.
"""
from __future__ import annotations

import linecache

import pytest
from _pytest.reports import TestReport

RACE = "AST constructor recursion depth mismatch"


def plain_traceback(error: BaseException) -> str:
    """The exception first (the summary line shows it), then its frames outside pytest's own."""
    lines = [f"{type(error).__name__}: {error}", "Traceback (most recent call last):"]
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if any(part in code.co_filename for part in ("/_pytest/", "/pluggy/")):
            tb = tb.tb_next
            continue
        lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
        source = linecache.getline(code.co_filename, tb.tb_lineno).strip()
        if source:
            lines.append(f"    {source}")
        tb = tb.tb_next
    return "\n".join(lines)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    try:
        return (yield)
    except SystemError as error:
        if RACE not in str(error) or call.excinfo is None:
            raise
        longrepr = (f"{plain_traceback(call.excinfo.value)}\n\n"
                    f"(a plain report: pytest's own failed with {error})")
        sections = [(f"Captured {key} {when}", content) for when, key, content in item._report_sections]
        return TestReport(item.nodeid, item.location, dict.fromkeys(item.keywords, 1), "failed", longrepr,
                          call.when, sections, call.duration, call.start, call.stop, item.user_properties)

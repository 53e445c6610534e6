"""lab/sdk.py: the Pulumi SDK's private parts the lab and the tests use, read from the pinned
release. An SDK upgrade (requirements.txt) fails here first, naming what to read again."""
import re
from pathlib import Path

import pulumi
import pytest

from lab import sdk

ROOT = Path(__file__).resolve().parents[2]


def test_the_sdk_is_the_release_the_module_was_read_from():
    (pin,) = re.findall(r"^pulumi==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert sdk.PINNED == pin
    sdk.check()


def test_another_release_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(sdk, "version", lambda name: "9.9.9")
    with pytest.raises(RuntimeError, match="read from the Pulumi SDK 3.272.0, this is 9.9.9"):
        sdk.check()


def test_every_private_name_is_there_and_does_what_it_says():
    assert sdk.is_secret({sdk.SIG_KEY: sdk.SECRET_SIG, "value": "x"}) and not sdk.is_secret({"value": "x"})
    sdk.pending()  # (whatever earlier tests left)
    assert sdk.pending() == []  # emptied by the call before

    async def seven():
        return 7
    assert sdk.wait(seven()) == 7
    sdk.ensure_event_loop()
    blob = sdk.serialize_provider(pulumi.dynamic.ResourceProvider())
    assert isinstance(blob, str) and len(blob) > 20


def test_no_other_module_reaches_into_the_sdk():
    """Private names of pulumi.* appear in lab/sdk.py alone."""
    offenders = []
    for path in [*ROOT.glob("lab/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("components/**/*.py")]:
        if path.name in ("sdk.py", "test_sdk.py"):
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {m}" for m in
                      re.findall(r"(?:sync_await|rpc|settings|mocks|pmocks|psettings)\._\w+|SETTINGS\b", text)]
    assert offenders == []

"""The promises' own guards still guard: scripts/mutation-check.py breaks each promise in a copy
of the tree and expects its tests to fail (the unit-test part here; `--lab` adds the lab's)."""
import subprocess
import sys

from conftest import ROOT


def test_every_unit_mutation_is_killed():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/mutation-check.py")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    killed = [line for line in proc.stdout.splitlines() if line.startswith("killed")]
    assert len(killed) >= 5, proc.stdout

# make lab         -- the example network, up for real on lab hosts on this machine (root)
# make lab-status  -- its table again: overlay addresses, handshakes, reachability
# make lab-down    -- pulumi destroy in the lab, then every lab host and namespace removed
# make test        -- install what the tests need (apt as root, pinned pip into .venv), run them all
.PHONY: test deps bench lab lab-status lab-down

deps:
	./scripts/install-deps.sh

test: deps
	.venv/bin/python -m pytest -q --durations=25 tests

lab: deps
	.venv/bin/python -m lab up

lab-status: deps
	.venv/bin/python -m lab status

lab-down: deps
	.venv/bin/python -m lab down

bench: deps
	.venv/bin/python benchmarks/program_scale.py
	.venv/bin/python benchmarks/status_load.py
	.venv/bin/python benchmarks/change_steps.py
	.venv/bin/python benchmarks/lab_converge.py
	.venv/bin/python benchmarks/lab_changes.py
	.venv/bin/python benchmarks/lab_throughput.py
	.venv/bin/python benchmarks/lab_postgres.py
	.venv/bin/python benchmarks/lab_backup.py

# make test   -- install what the tests need (apt as root, pinned pip into .venv), run them all
.PHONY: test deps bench

deps:
	./scripts/install-deps.sh

test: deps
	.venv/bin/python -m pytest -q tests

bench: deps
	.venv/bin/python benchmarks/program_scale.py

# The two commands of the README, plus the pieces they are made of.
.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/genray demo

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup  # the edit loop: no Ray, no Serve, no CLI subprocess (about 2 minutes)
	.venv/bin/python -m pytest -q -m "not integration"

bench: setup  # benchmarks/_*.py are helper modules, not benchmarks
	@for script in benchmarks/[!_]*.py; do echo "== $$script"; .venv/bin/python $$script || exit 1; done

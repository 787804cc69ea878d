# The two commands of the README, plus the pieces they are made of.
.PHONY: setup demo test test-slow

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/genray demo

test: setup
	.venv/bin/python -m pytest -q

test-slow: setup
	GENRAY_SLOW=1 .venv/bin/python -m pytest -q

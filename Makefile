# The two commands the README opens with. Both set up .venv on first use.
.PHONY: setup train test bench
setup:
	bash scripts/setup.sh
train: setup
	.venv/bin/slimtune train
test: setup
	.venv/bin/python -m pytest -n 2 tests
bench: setup
	.venv/bin/python -m slimtune.bench --preset cpu

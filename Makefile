# The two commands the README opens with. Both set up .venv on first use, with the exact versions
# of requirements-lock.txt (scripts/setup.sh). `make test` first prints the CPU's bf16-relevant flags and
# what train.precision=auto picks there; `pytest --cpu-bf16=0|1` runs the suite as on the other kind of CPU.
.PHONY: setup train test bench test-latest lock
setup:
	bash scripts/setup.sh
train: setup
	.venv/bin/slimtune train
test: setup
	@.venv/bin/python -c "from slimtune.train.resources import cpu_summary; print(cpu_summary())"
	.venv/bin/python -m pytest -n 2 tests
bench: setup
	.venv/bin/python -m slimtune.bench --preset cpu
# The compatibility check: a fresh .venv-latest with the newest releases pyproject's ranges allow
# (and the newest peft), then the whole suite. When it passes, `make lock` pins those versions.
test-latest:
	rm -rf .venv-latest
	VENV=.venv-latest LOCK=none bash scripts/setup.sh
	.venv-latest/bin/python -c "import transformers, accelerate, datasets, peft, pydantic, torch; print('test-latest:', *(f'{m.__name__} {m.__version__}' for m in (transformers, accelerate, datasets, peft, pydantic, torch)))"
	.venv-latest/bin/python -m pytest -n 2 tests
lock:
	bash scripts/lock.sh .venv-latest

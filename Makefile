# The two commands of the README: `make train` (set-up + dry-run training), `make test` (set-up + tests).
PY := .venv/bin/python
ARGS ?=

.PHONY: setup train test
setup:
	@bash scripts/setup.sh

train: setup
	$(PY) -m axon.train launch.nproc_per_node=8 parallel.dp=8 model=tiny run.name=dry-run train.steps=60 checkpoint.every=20 $(ARGS)

test: setup
	$(PY) -m pytest -q --durations=25 tests $(ARGS)

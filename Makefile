# The two commands of the README.
#   make demo  - set up, then learn the built-in default stream with PET only, Static ConPET and
#                Dynamic ConPET side by side; prints one table and writes the comparison plot
#   make test  - set up, then run the test suite but the tests marked slow (about 12 minutes on 2 cores)
#   make test-slow - the tests marked slow (multi-process and kill-and-resume matrices, rebuilds)
.PHONY: setup demo test test-slow

setup:
	@bash scripts/setup.sh

DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

demo: setup
	.venv/bin/conpet run --learner 'sequential,emr*,dynamic' --epochs 2 --out $(DEMO_OUT)

test: setup
	.venv/bin/python -m pytest -q -m "not slow"

test-slow: setup
	.venv/bin/python -m pytest -q -m slow

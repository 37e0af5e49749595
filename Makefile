# The two commands of the README.
#   make demo  - set up, then run the built-in default stream and print the metrics table
#   make test  - set up, then run the test suite
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/conpet run

test: setup
	.venv/bin/python -m pytest -q

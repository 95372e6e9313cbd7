# Two entry points, each sets itself up: `make demo` (main job) and `make test` (whole suite).
# The virtual environment .venv is (re)built when missing or older than pyproject.toml/constraints.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.tllab-installed

.PHONY: demo test lint clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tllab-train experiment=digits_source_only

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check tllab tests scripts

clean-venv:
	rm -rf $(VENV)

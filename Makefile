# Build, test and benchmark ociregistry.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SOURCES := $(shell find ociregistry -name '*.py' ! -name '_buildinfo.py') pyproject.toml

.PHONY: server test lint bench run clean

server: bin/ociregistry

bin/ociregistry: $(SOURCES) build/stamp.py | $(VENV)/.done
	$(VPY) build/stamp.py ociregistry/_buildinfo.py
	mkdir -p bin
	$(VENV)/bin/shiv --quiet --reproducible --compressed \
		-p '/usr/bin/env python3' -e ociregistry.__main__:main \
		-o bin/ociregistry.tmp .
	mv bin/ociregistry.tmp bin/ociregistry

$(VENV)/.done: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(VENV)/.done
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.done
	$(VENV)/bin/ruff check ociregistry tests
	$(VENV)/bin/ruff format --check ociregistry tests
	$(VENV)/bin/mypy ociregistry

run: server
	bin/ociregistry --image-path /tmp/images serve --port 8080

bench: server
	$(VPY) tests/bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf bin $(VENV) build/out ociregistry/_buildinfo.py

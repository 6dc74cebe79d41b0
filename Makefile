# The two commands a newcomer needs: `make run` and `make test`. Both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench schemas compose-check clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/outreach up --demo $(UP_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/run_bench.py

schemas: $(STAMP)
	$(BIN)/python -m schemas.export
	$(BIN)/python -m schemas.asyncapi

compose-check:
	OUTREACH_API_ENCRYPTION_KEY=$${OUTREACH_API_ENCRYPTION_KEY:-compose-check-only} docker-compose -f docker-compose.yml config -q

clean:
	rm -rf var .pytest_cache

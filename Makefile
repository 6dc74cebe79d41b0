# The two commands a newcomer needs: `make run` and `make test`. Both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages the tests and checks use, in this one place: docker-compose (v1 validates the compose file
# without an engine), prometheus (its promtool checks deploy/prometheus/), chromium and chromium-driver
# (browser tests, screenshots). `make install`, `make test` and `make compose-check` install those missing;
# without root (or passwordless sudo) or apt-get they only say which are missing, and the tests that need
# them skip, saying why.
DEBIAN_PACKAGES := docker-compose prometheus chromium chromium-driver

.PHONY: install system-packages run test bench schemas compose-check screenshots clean

# axe-core from npm (package.json pins it, package-lock.json locks it): the browser tests' accessibility check
# injects node_modules/axe-core/axe.min.js. No npm (node brings it on this kind of machine): Debian's npm is
# installed as the packages above are; still none: said, and the browser tests skip.
NODE_MODULES := node_modules/.package-lock.json

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

system-packages:
	@missing=""; for package in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$package"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "make: no apt-get here: install$$missing yourself (the tests needing them skip)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else \
	  echo "make: not root: apt-get install$$missing yourself (the tests needing them skip)"; exit 0; fi; \
	echo "make: installing Debian packages:$$missing"; \
	{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing; } >/dev/null \
	  || echo "make: apt-get could not install$$missing (the tests needing them skip)"

install: $(STAMP) system-packages $(NODE_MODULES)

$(NODE_MODULES): package.json package-lock.json
	@command -v npm >/dev/null || $(MAKE) --no-print-directory system-packages DEBIAN_PACKAGES=npm
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "make: no npm: the browser tests skip (they need node_modules/axe-core)"; fi

run: $(STAMP)
	$(BIN)/outreach up --demo $(UP_ARGS)

test: $(STAMP) system-packages $(NODE_MODULES)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/run_bench.py

schemas: $(STAMP)
	$(BIN)/python -m schemas.export
	$(BIN)/python -m schemas.asyncapi

# The compose file, and the Prometheus configuration it mounts with its alert rules and their unit tests.
compose-check: system-packages
	OUTREACH_API_ENCRYPTION_KEY=$${OUTREACH_API_ENCRYPTION_KEY:-compose-check-only} docker-compose -f docker-compose.yml config -q
	promtool check config deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts.test.yml

# A PNG of each console screen in docs/screenshots/, from a stack with demo data (tests/browser/screenshots.py).
screenshots: $(STAMP) system-packages
	$(BIN)/python -m tests.browser.screenshots docs/screenshots

clean:
	rm -rf var .pytest_cache

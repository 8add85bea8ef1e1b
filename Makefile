# predgate: `make run` sets up, builds the default bundle if needed and serves it; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREDGATE := $(VENV)/bin/predgate
BUNDLE ?= bundles/fashion-mnist-quick
PROFILE ?= quick
DATASET ?= fashion-mnist
PORT ?= 8000
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data system-deps bundle run serve test test-all lint audit audit-report hostile load clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# apt waits up to 10 minutes for a package lock another apt holds, instead of failing at once.
APT_WAIT ?= -o DPkg::Lock::Timeout=600

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files).
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ] && [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte ]; then \
		$(SUDO) apt-get $(APT_WAIT) update -qq && $(SUDO) apt-get $(APT_WAIT) install -y -qq dataset-fashion-mnist; fi

# Programs the integration tests start or call: a Prometheus server, docker-compose (config validation
# only), HAProxy (the replica test's balancer), nginx (the slow-client test's front, deploy/nginx),
# Chromium with its driver (the review page's browser test) and redis-server (the Redis outbox's tests).
system-deps: data
	@if ! command -v prometheus >/dev/null || ! command -v docker-compose >/dev/null || ! command -v haproxy >/dev/null \
		|| ! { command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || ! command -v chromium >/dev/null \
		|| ! command -v chromedriver >/dev/null || ! command -v redis-server >/dev/null; then \
		$(SUDO) apt-get $(APT_WAIT) update -qq && $(SUDO) apt-get $(APT_WAIT) install -y -qq prometheus docker-compose \
		haproxy nginx chromium chromium-driver redis-server; fi

bundle: setup data
	$(PREDGATE) build --dataset $(DATASET) --profile $(PROFILE) --out $(BUNDLE)

run: bundle
	$(PREDGATE) serve --bundle $(BUNDLE) --port $(PORT)

serve: setup
	$(PREDGATE) serve --bundle $(BUNDLE) --port $(PORT)

# CI's suite leaves out the tests marked slow (open-world runs, early-stopping parity, the replica test's
# no-retry control, cross-process seeding, the memory probe: 406 s more, measured); `make test-all`
# runs everything.
test: setup system-deps
	$(VENV)/bin/pytest -m "not slow"

test-all: setup system-deps
	$(VENV)/bin/pytest

# ruff (rules and line length from pyproject.toml, layout by ruff format), then the import contracts of
# pyproject.toml [tool.importlinter].
LINT_PATHS := models offline service bench cli tests examples
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/lint-imports

# Known vulnerabilities in the installed dependencies (PyPI's advisory data). --strict: a package that
# could not be audited fails the target instead of passing silently.
# pip-audit lives in its own venv: torchattacks pins an older requests than pip-audit accepts.
AUDIT_VENV ?= .venv-audit
audit: setup
	[ -x $(AUDIT_VENV)/bin/pip-audit ] || ($(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install --quiet 'pip-audit>=2.7')
	$(AUDIT_VENV)/bin/pip-audit --vulnerability-service pypi --strict --progress-spinner off \
		--path $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# CI's audit: the same scan as a JSON report, then .ci/audit_summary.py fails on a vulnerability that has a
# fixed release, prints those without one, and counts the packages that could not be audited out loud.
audit-report: setup
	[ -x $(AUDIT_VENV)/bin/pip-audit ] || ($(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install --quiet 'pip-audit>=2.7')
	$(AUDIT_VENV)/bin/pip-audit --vulnerability-service pypi --progress-spinner off -f json -o $(AUDIT_VENV)/report.json \
		--path $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	$(PY) .ci/audit_summary.py $(AUDIT_VENV)/report.json

# The hostile-input suite against a server already running on PORT (loopback only).
hostile: setup
	$(PY) -m bench.hostile --url http://127.0.0.1:$(PORT) --json reports/hostile.json

# 64 closed-loop clients for 60 s against a server already running on PORT (docs/reliability.md: start
# it with PREDGATE_QUEUE_LIMIT=16 to see the queue shed); every answer checked against its request id.
load: setup
	$(PY) -m bench.load --url http://127.0.0.1:$(PORT) --concurrency 64 --seconds 60 --deadline-every 10 \
		--deadline-s 0.25 --json reports/load.json

# Containers (docs/containers.md). docker-base: a local base image from Debian packages (debootstrap, as
# root; skipped when it exists, FORCE=1 rebuilds) for machines that cannot pull from Docker Hub.
# docker-test: build the CPU image on that base (legacy builder) and check it against a local server:
# readiness, same /predict answers, non-root, read-only root, graceful SIGTERM, size and start-up time
# (reports/scaling/docker-test.json). Minutes and GBs of downloads the first time: not part of `make test`.
# EXTRA_CA_FILE: PEM of the CAs the build must trust (a TLS-inspecting proxy's); empty for none.
.PHONY: docker-base docker-test
DOCKER_BASE_IMAGE ?= predgate-base:bookworm
DOCKER_IMAGE ?= predgate:cpu
EXTRA_CA_FILE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)

docker-base:
	$(SUDO) env BASE_IMAGE=$(DOCKER_BASE_IMAGE) FORCE=$(FORCE) deploy/docker/build-base.sh

docker-test: setup
	$(PY) deploy/docker/docker_test.py --image $(DOCKER_IMAGE) --base-image $(DOCKER_BASE_IMAGE) \
		--bundle $(BUNDLE) --extra-ca-file "$(EXTRA_CA_FILE)"

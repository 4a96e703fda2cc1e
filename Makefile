# lanyard.machine_id -- developer entry points. Everything heavy is cached under ~/.cache/lanyard.
SHELL := /bin/bash
VENV = $(shell scripts/bootstrap.sh | tail -n1)
PY = $(VENV)/bin/python
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/build/collections
export PYTHONPATH := $(CURDIR)/tests
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv test test-unit test-integration sanity testbed-build testbed-check testbed-up testbed-down demo demo-down

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

venv: ## create the Python venv (outside the repo) and the collection link
	@scripts/bootstrap.sh

testbed-build: ## find or build teleport/tctl/tbot/kube-apiserver/kubectl/etcd (cached)
	@PATH=$(VENV)/bin:$$PATH $(PY) tests/testbed/build.py

testbed-check: ## report which test bed binaries are present
	@$(PY) tests/testbed/build.py --check

testbed-up: testbed-build ## start the real test bed in the background and print what to export
	@$(PY) -m testbed up

testbed-down: ## stop the test bed
	@$(PY) -m testbed down

test: testbed-build ## run every test: unit, integration on the real test bed, molecule (pytest-xdist workers: scripts/test.sh)
	@PATH=$(VENV)/bin:$$PATH PYTHON=$(PY) scripts/test.sh $(PYTEST_ARGS)

test-unit: ## unit tests only (no real components)
	@PATH=$(VENV)/bin:$$PATH $(PY) -m pytest tests/unit $(PYTEST_ARGS)

sanity: ## ansible-test sanity with empty ignore files
	@PATH=$(VENV)/bin:$$PATH scripts/sanity.sh

demo: testbed-build ## the guide end to end: real test bed + 3 systemd hosts + playbooks/rollout.yml
	@PATH=$(VENV)/bin:$$PATH $(PY) scripts/demo.py up

demo-down: ## stop the demo's hosts and test bed
	@PATH=$(VENV)/bin:$$PATH $(PY) scripts/demo.py down

# unbounded-agent ops — build, package, test and demo.
#   make release VERSION=1.2.3   dist/unbounded-agent-linux-amd64.tar.gz (and dist/unbounded-agent)
#   make deb     VERSION=1.2.3   dist/unbounded-agent_<version>_all.deb, checked with lintian
#   make man                     packaging/man/unbounded-agent.8 from the CLI's help and its template
#   make test                    fast tests and the systemd test-host tests (needs root)
#   make demo                    boots a test host, installs the .deb and shows what a user sees
#   make check                   ruff (lint) on lib/, tests/, demo/, bench/ and packaging/, then mypy on lib/
#   make bench                   timings and peak memory (bench/bench_*.py)
#   make e2e-cluster             the watcher against the cluster KUBECONFIG names
SHELL := /bin/bash
VERSION ?= $(shell cat VERSION)
DIST ?= dist
PY := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
DEB := $(DIST)/unbounded-agent_$(VERSION)_all.deb
DEB_BUILD ?= build/deb

.PHONY: all setup release deb man venv check test test-fast testhost-tree demo bench e2e-cluster clean

all: deb

# Installs missing apt packages (as root); quick when all are present.
setup:
	bash packaging/setup-host.sh

release:
	$(PY) packaging/build_release.py --version '$(VERSION)' --out '$(DIST)'

# dpkg-buildpackage wants debian/ at the top of a source tree: assemble one under build/.
deb: setup release
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/src/agent
	cp -r pyproject.toml README.md bin units $(DEB_BUILD)/src/
	mkdir -p $(DEB_BUILD)/src/packaging && cp -r packaging/man packaging/kubernetes $(DEB_BUILD)/src/packaging/
	echo $(VERSION) > $(DEB_BUILD)/src/VERSION
	cp -r packaging/debian $(DEB_BUILD)/src/debian
	$(PY) packaging/build_release.py --version $(VERSION) --out $(DIST) --stage-only $(DEB_BUILD)/src/lib
	cp $(DIST)/unbounded-agent $(DEB_BUILD)/src/agent/unbounded-agent
	$(PY) packaging/debian_changelog.py $(VERSION) > $(DEB_BUILD)/src/debian/changelog
	# A clean PATH: the package must build with the distribution's python3, not another one first on PATH.
	cd $(DEB_BUILD)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign >../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	cp $(DEB_BUILD)/unbounded-agent_$(VERSION)_all.deb $(DIST)/
	lintian --fail-on error $(DEB)
	@echo "built $(DEB)"

# The man page is generated from the CLI's help and checked in (tests/unit/test_man_page.py).
man:
	$(PY) packaging/manpage.py --write

$(VENV)/.ready: tests/requirements.txt | setup
	$(PY) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q -r tests/requirements.txt
	touch $@

venv: $(VENV)/.ready

testhost-tree: venv
	$(VPY) tests/support/testhost_tree.py

check: venv
	$(VENV)/bin/ruff check lib tests demo bench packaging
	$(VENV)/bin/mypy lib

test: venv deb
	UNBOUNDED_TESTS_DEB_FRESH=1 $(VPY) -m pytest tests/unit tests/host

test-fast: venv
	$(VPY) -m pytest tests/unit

demo: venv deb
	$(VPY) demo/demo.py --deb $(DEB)

# The watcher's end-to-end tests against the real cluster KUBECONFIG names (skipped when unset).
e2e-cluster: venv
	UNBOUNDED_E2E_CLUSTER=1 $(VPY) -m pytest -rs tests/cluster

# Speed and memory targets are measured here, never asserted in tests.
bench: venv deb
	@for b in bench/bench_*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf build $(DIST) $(VENV)

# unbounded-agent ops — build, package, test and demo.
#   make release VERSION=1.2.3   dist/unbounded-agent-linux-amd64.tar.gz (and dist/unbounded-agent)
#   make deb     VERSION=1.2.3   dist/unbounded-agent_<version>_all.deb, checked with lintian
#   make rpm     VERSION=1.2.3   dist/unbounded-agent-<version>-1.noarch.rpm (RHEL/Fedora), checked with rpmlint
#   make man                     packaging/man/unbounded-agent.8 from the CLI's help and its template
#   make test                    fast tests, the package tests and the systemd test-host tests (needs root)
#   make demo                    boots a test host, installs the .deb and shows what a user sees
#   make check                   ruff (lint) on lib/, tests/, demo/, bench/ and packaging/, then mypy on lib/
#   make soak                    100 operations in a row on one test host, asserting nothing grows (SOAK_OPS=100;
#                                `make test` runs the same soak with 15)
#   make faults                  seeded kill -9s and power cuts at every step (FAULT_TRIALS=200 FAULT_SEED=1)
#   make bench                   timings and peak memory in one table (bench/bench.py; BENCH_RUNS=5)
#   make e2e-cluster             the watcher against the cluster KUBECONFIG names
SHELL := /bin/bash
VERSION ?= $(shell cat VERSION)
DIST ?= dist
PY := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
DEB := $(DIST)/unbounded-agent_$(VERSION)_all.deb
DEB_BUILD ?= build/deb
RPM_BUILD ?= build/rpm
RPM_RELEASE ?= 1
RPM := $(DIST)/unbounded-agent-$(VERSION)-$(RPM_RELEASE).noarch.rpm
# The target's Python version when Debian's rpm builds the package (packaging/rpm/macros.build-host).
RPM_PYTHON3_VERSION ?=
# rpmbuild sees the build host's clock in the changelog unless SOURCE_DATE_EPOCH pins it.
RPM_CHANGELOG_DATE := $(shell LC_ALL=C date -u $(if $(SOURCE_DATE_EPOCH),-d @$(SOURCE_DATE_EPOCH)) '+%a %b %d %Y')

.PHONY: all setup release deb rpm man venv check test test-fast test-package testhost-tree demo soak bench faults e2e-cluster clean

all: deb

# Installs missing apt packages (as root); quick when all are present.
setup:
	bash packaging/setup-host.sh

release:
	$(PY) packaging/build_release.py --version '$(VERSION)' --out '$(DIST)'

# The source tree both packages build from: the repository's files, the library with the version
# stamped in and the release zipapp (the packaged agent). $(1) is the directory to fill.
define stage_source
	rm -rf $(1) && mkdir -p $(1)/agent $(1)/packaging
	cp -r pyproject.toml README.md bin units $(1)/
	cp -r packaging/man packaging/kubernetes $(1)/packaging/
	echo $(VERSION) > $(1)/VERSION
	$(PY) packaging/build_release.py --version $(VERSION) --out $(DIST) --stage-only $(1)/lib
	cp $(DIST)/unbounded-agent $(1)/agent/unbounded-agent
endef

# dpkg-buildpackage wants debian/ at the top of a source tree: assemble one under build/.
deb: setup release
	rm -rf $(DEB_BUILD)
	$(call stage_source,$(DEB_BUILD)/src)
	cp -r packaging/debian $(DEB_BUILD)/src/debian
	$(PY) packaging/debian_changelog.py $(VERSION) > $(DEB_BUILD)/src/debian/changelog
	# A clean PATH: the package must build with the distribution's python3, not another one first on PATH.
	cd $(DEB_BUILD)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign >../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	cp $(DEB_BUILD)/unbounded-agent_$(VERSION)_all.deb $(DIST)/
	lintian --fail-on error $(DEB)
	@echo "built $(DEB)"

# rpmbuild from a source tarball of the same staged tree. On Debian the build dependencies come from
# apt (setup), not from an RPM database, hence --nodeps; the RHEL/Fedora macros Debian's rpm lacks come
# from packaging/rpm/macros.build-host, loaded only where rpm does not know %systemd_post.
rpm: setup release
	rm -rf $(RPM_BUILD) && mkdir -p $(RPM_BUILD)/SOURCES
	$(call stage_source,$(RPM_BUILD)/unbounded-agent-$(VERSION))
	cp -r packaging/rpm $(RPM_BUILD)/unbounded-agent-$(VERSION)/packaging/
	# The RPM ships the license text (Fedora's %license); Debian's packages point at common-licenses.
	# Not at the top of the tree, where setuptools would add it to the wheel's metadata.
	cp /usr/share/common-licenses/Apache-2.0 $(RPM_BUILD)/unbounded-agent-$(VERSION)/packaging/rpm/LICENSE
	tar -C $(RPM_BUILD) --owner=0 --group=0 -czf $(RPM_BUILD)/SOURCES/unbounded-agent-$(VERSION).tar.gz unbounded-agent-$(VERSION)
	macros=$$(rpm --eval '%{?systemd_post:found}' | grep -q found || echo "--load packaging/rpm/macros.build-host"); \
	env PATH=/usr/sbin:/usr/bin:/sbin:/bin rpmbuild -bb --nodeps $$macros \
	  --define "_topdir $(abspath $(RPM_BUILD))" --define "upstream_version $(VERSION)" \
	  --define "pkg_release $(RPM_RELEASE)" --define "changelog_date $(RPM_CHANGELOG_DATE)" \
	  $(if $(RPM_PYTHON3_VERSION),--define "python3_version $(RPM_PYTHON3_VERSION)") \
	  packaging/rpm/unbounded-agent.spec >$(RPM_BUILD)/build.log 2>&1 || { tail -40 $(RPM_BUILD)/build.log; exit 1; }
	cp $(RPM_BUILD)/RPMS/noarch/$(notdir $(RPM)) $(DIST)/
	rpmlint -c packaging/rpm/rpmlint.toml $(RPM)
	@echo "built $(RPM)"

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

# Test files run side by side (pytest-xdist), each file whole on one worker: its module's test hosts and
# servers stay with it. Every test host has its own overlay, network namespace, machine name and cgroup
# (testhost.py). Host tests mostly wait on systemd, so more workers than cores pay: on 2 cores six did best
# (four left a fifth of the CPU idle; eight spent more of it on contention and took longer). Files are handed
# out in collection order: the longest measured first (tests/conftest.py), then host, package and unit files.
TEST_WORKERS ?= 6
TEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# The test-host tree is built first, outside the test run: its package downloads are set-up, not test traffic.
# It builds beside the packages (a download and a dpkg run against two package builds: one core each).
test: venv
	$(MAKE) testhost-tree & tree=$$!; $(MAKE) deb rpm; packages=$$?; wait $$tree && [ $$packages = 0 ]
	UNBOUNDED_TESTS_DEB_FRESH=1 $(VPY) -m pytest $(TEST_PARALLEL) tests/host tests/package tests/unit

test-fast: venv
	$(VPY) -m pytest -n 2 tests/unit

# The built packages themselves: payloads compared, the .rpm installed into a scratch root.
test-package: venv deb rpm
	UNBOUNDED_TESTS_DEB_FRESH=1 $(VPY) -m pytest tests/package

demo: venv deb
	$(VPY) demo/demo.py --deb $(DEB)

# The watcher's end-to-end tests against the real cluster KUBECONFIG names (skipped when unset).
e2e-cluster: venv
	UNBOUNDED_E2E_CLUSTER=1 $(VPY) -m pytest -rs tests/cluster

# A long series of upgrades, no-ops, rollbacks and failed upgrades on one test host: descriptors, RSS, disk,
# units and failed units measured after a warm-up and at the end (tests/host/test_soak_*; a multiple of 5).
SOAK_OPS ?= 100
soak: venv deb
	UNBOUNDED_TESTS_DEB_FRESH=1 UNBOUNDED_SOAK_OPS=$(SOAK_OPS) $(VPY) -m pytest tests/host/test_soak_many_operations_leave_no_growth.py

# The fault matrix (tests/host/test_fault_matrix.py): each trial prints its seed, step, fault and outcome, and
# the run ends with a table of trials and failures per step. FAULT_REPLAY=<seed>,... runs single trials again.
FAULT_TRIALS ?= 200
FAULT_SEED ?= 1
faults: venv deb
	UNBOUNDED_TESTS_DEB_FRESH=1 FAULT_TRIALS=$(FAULT_TRIALS) FAULT_SEED=$(FAULT_SEED) FAULT_REPLAY=$(FAULT_REPLAY) \
	  $(VPY) -m pytest -q -p no:cacheprovider tests/host/test_fault_matrix.py

# Speed and memory targets are measured here, never asserted in tests: one table, each figure the median of
# BENCH_RUNS runs beside its baseline (bench/bench.py; BENCH_ARGS e.g. --only upgrade --write bench/results.md).
BENCH_RUNS ?= 5
bench: venv deb
	$(VPY) bench/bench.py --runs $(BENCH_RUNS) $(BENCH_ARGS)

clean:
	rm -rf build $(DIST) $(VENV)

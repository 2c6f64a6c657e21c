# Two commands for a new machine: `make demo` runs the main job, `make test` runs the tests.
# Both set up what is missing first: Debian packages (poppler, fonts), a virtualenv, the package.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := poppler-utils fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-courier-prime \
	fonts-gnutypewriter fonts-ebgaramond fonts-crosextra-caladea fonts-crosextra-carlito fonts-open-sans \
	fonts-lato fonts-dkg-handwriting fonts-femkeklaver fonts-humor-sans fonts-dancingscript fonts-kristi \
	fonts-comic-neue fonts-blankenburg fonts-junicode
DEMO := out/demo

.PHONY: setup demo test clean .system-packages

setup: $(VENV)/.installed .system-packages

.system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing; \
	fi

# torch is pinned to the CPU build first so that no multi-GB CUDA build is pulled in;
# on a GPU machine install the torch you want before `make setup`. pip would byte-compile the
# packages on one core (1.5 minutes here); compileall does it on all of them. The few third-party
# files that do not compile (templates, Python 2 examples) are skipped, as pip skips them.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --no-compile "torch==2.13.0"
	$(BIN)/pip install -q --no-compile -e ".[test]"
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

# The samples are made once, under another name and renamed when whole: a killed synth's part of a set had been
# taken for them by every later make demo (and synth refuses a folder that holds files).
demo: setup
	test -d $(DEMO)/samples || { rm -rf $(DEMO)/samples.partial && \
		$(BIN)/trocr-pipeline synth docs --output $(DEMO)/samples.partial --count 4 --seed 7 && \
		mv $(DEMO)/samples.partial $(DEMO)/samples; }
	$(BIN)/trocr-pipeline run $(DEMO)/samples --output $(DEMO)/result
	$(BIN)/trocr-pipeline show $(DEMO)/result

# Two test processes, each module's tests in one of them (its module fixtures, a Ray head or a job's output, made
# once): the tests wait on Ray, subprocesses and disks for a third of the time, and the other process uses it.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

clean:
	rm -rf out .pytest_cache

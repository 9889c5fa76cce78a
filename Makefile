# Two commands on a fresh machine: `make run` and `make test`.
# Every install step lives here; CI (.ci/run) calls `make test`.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests drive as independent peers, the tools that run the service with the
# systemd unit's capabilities, and the file-system tools the storage fault tests mount with (as
# root) (command -> package).
TEST_TOOLS := sipp:sip-tester openssl:openssl kamailio:kamailio mosquitto:mosquitto systemd-analyze:systemd \
	setpriv:util-linux capsh:libcap2-bin \
	mount:mount mkfs.ext4:e2fsprogs
# Debian shared libraries the service loads (soname -> package): libopus for the Opus codec.
SYSTEM_LIBS := libopus.so.0:libopus0 libbpf.so.1:libbpf1
# Commands the service runs (command -> package): tc lists stale kernel-path filters at start.
RUN_TOOLS := tc:iproute2
# The kernel path's BPF object, built by Debian clang (uapi headers from linux-libc-dev, libbpf-dev's
# bpf_helpers.h); the service runs without it (userspace path) and says so.
BPF_SOURCE := voiceline/audio/kernel/rtp_forward.bpf.c
BPF_OBJECT := voiceline/audio/kernel/rtp_forward.bpf.o
BPF_BUILD_PACKAGES := clang libbpf-dev linux-libc-dev
# Debian packages `make bench` compares against (command -> package): rtpengine as a userspace relay;
# the tests drive it too (the bench harness's own test).
BENCH_TOOLS := rtpengine:rtpengine-daemon
# Debian packages that render the default prompts (`make prompts`; neither test nor run needs them):
# festival with the slt HTS voice (the default), and flite (its slt voice, the alternative).
PROMPT_TOOLS := festival festvox-us-slt-hts flite

.PHONY: kernel-path run test test-fast bench bench-ramp soak prompts prompts-measure system-libs system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the package metadata changes.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-prompts: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[prompts]'
	touch $@

# $(call install-missing,COMMANDS,LIBRARIES): apt-get install the packages (command:package,
# soname:package) whose command or shared library is not on this machine.
install-missing = missing=""; for pair in $(1); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair\#*:}"; \
	done; \
	for pair in $(2); do \
	  PATH="$$PATH:/usr/sbin:/sbin" ldconfig -p | grep -q "$${pair%%:*}" || missing="$$missing $${pair\#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

system-libs:
	@$(call install-missing,$(RUN_TOOLS),$(SYSTEM_LIBS))

system-deps:
	@$(call install-missing,$(TEST_TOOLS) $(RUN_TOOLS) $(BENCH_TOOLS),$(SYSTEM_LIBS))

$(BPF_OBJECT): $(BPF_SOURCE)
	@dpkg -s $(BPF_BUILD_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(BPF_BUILD_PACKAGES); }
	clang -O2 -g -Wall -target bpf -I/usr/include/$$(uname -m)-linux-gnu -c $< -o $@

# The kernel path's object alone (run, test and bench build it too).
kernel-path: $(BPF_OBJECT)

run: $(VENV)/.installed system-libs $(BPF_OBJECT)
	$(BIN)/voiceline serve $(ARGS)

# Load test: the same generator against voiceline (real calls, real server) and rtpengine on
# loopback, side by side (see README, Performance). bench-ramp: voiceline alone, ramping up.
bench: $(VENV)/.installed system-libs $(BPF_OBJECT)
	@$(call install-missing,$(BENCH_TOOLS),)
	$(BIN)/python -m voiceline.bench --side-by-side $(BENCH_ARGS)

bench-ramp: $(VENV)/.installed system-libs $(BPF_OBJECT)
	$(BIN)/python -m voiceline.bench $(BENCH_ARGS)

# Churn soak (not part of `make test`): SOAK_CALLS short calls (RTP on a share) through a real server
# on loopback, failed and hung calls and what the server holds at start, middle and end (see README).
SOAK_CALLS ?= 20000
soak: $(VENV)/.installed system-libs $(BPF_OBJECT)
	$(BIN)/python -m voiceline.soak --calls $(SOAK_CALLS) $(SOAK_ARGS)

test: $(VENV)/.installed-test system-deps $(BPF_OBJECT)
	$(BIN)/python -m mypy voiceline
	$(BIN)/lint-imports
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit layer only (pytest marker `unit`, see tests/conftest.py): no sockets, no processes, no system packages.
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

# Default prompts: render prompts/<language>.toml into voiceline/audio/prompt_audio/ (commit the
# result). PROMPTS_ARGS passes options and prompt ids, e.g. PROMPTS_ARGS="welcome goodbye".
prompts: $(VENV)/.installed
	@dpkg -s $(PROMPT_TOOLS) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(PROMPT_TOOLS); }
	$(BIN)/python prompts/render.py $(PROMPTS_ARGS)

# How a narrowband caller would understand the rendered prompts: an offline recogniser transcribes them.
prompts-measure: $(VENV)/.installed-prompts
	$(BIN)/python prompts/measure.py $(PROMPTS_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache

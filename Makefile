# The two commands of README.md: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCAL  ?= $(CURDIR)/var
CONFIG ?= config/dropcut.toml
SYSTEM_PACKAGES := libsystemd-dev pkg-config

.PHONY: run test lint bench system-deps clean

# systemd-python compiles against libsystemd; install it when we are allowed to.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
	fi

$(BIN)/dropcut: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[systemd,dev]'
	@touch $@

# Runs the daemon in the foreground on ./var/{inbox,outbox,quarantine,archive}.
# Needs DROPCUT_API_KEY (or api_key_file in the config).
run: $(BIN)/dropcut
	mkdir -p $(LOCAL)/inbox $(LOCAL)/outbox $(LOCAL)/quarantine $(LOCAL)/archive $(LOCAL)/state
	DROPCUT_INBOX=$(LOCAL)/inbox DROPCUT_OUTBOX=$(LOCAL)/outbox DROPCUT_QUARANTINE=$(LOCAL)/quarantine \
	DROPCUT_ARCHIVE=$(LOCAL)/archive DROPCUT_STATE_DIR=$(LOCAL)/state \
	$(BIN)/dropcut run --config $(CONFIG)

test: $(BIN)/dropcut
	$(BIN)/python -m pytest -q

lint: $(BIN)/dropcut
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy

bench: $(BIN)/dropcut
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

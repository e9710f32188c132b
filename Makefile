# The two commands of README.md: `make run` and `make test`. Both set up what they need.
# `make status`, `make check` and `make retry FILES=…` look at what `make run` runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCAL  ?= $(CURDIR)/var
# The settings `make run` starts from: everything but the folders comes from here.
BASE_CONFIG ?= config/dropcut.toml
# The one configuration of the local set-up: BASE_CONFIG with the folders under LOCAL
# (absolute paths: `dropcut … --config var/dropcut.toml` works from any directory).
LOCAL_ABS    := $(abspath $(LOCAL))
LOCAL_CONFIG := $(LOCAL_ABS)/dropcut.toml
# make's copy of what it last wrote to LOCAL_CONFIG: a LOCAL_CONFIG that differs was edited.
LOCAL_WRITTEN := $(LOCAL_ABS)/.dropcut.toml.written
LOCAL_DIRS := $(addprefix $(LOCAL_ABS)/,inbox outbox quarantine archive state)
SYSTEM_PACKAGES := libsystemd-dev pkg-config

.PHONY: run status check retry budget resume approve discard test lint bench system-deps clean

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

# var/dropcut.toml: BASE_CONFIG with inbox, outbox, quarantine, archive and state_dir under
# LOCAL, and api_key_file = LOCAL/api-key (unless BASE_CONFIG names a key file). Written
# when it is missing or BASE_CONFIG changed since; a copy you edited is never overwritten
# (make says so instead: delete it to have it written again, or touch it to keep it quiet).
$(LOCAL_CONFIG): $(BASE_CONFIG)
	@mkdir -p $(LOCAL_ABS)
	@if [ -f $@ ] && ! cmp -s $@ $(LOCAL_WRITTEN); then \
	  echo "make: $@ was edited, so it is kept as it is although $(BASE_CONFIG) changed since" \
	    "(delete it to have it written again, or touch it to keep it quietly)" >&2; \
	else \
	  { echo "# The local set-up of \`make run\`, written by make from $(BASE_CONFIG): the folders"; \
	    echo "# are under $(LOCAL_ABS), everything else is as there. Edit it freely: make does not"; \
	    echo "# overwrite a copy you changed. Delete it to have it written again."; \
	    echo "inbox = '$(LOCAL_ABS)/inbox'"; \
	    echo "outbox = '$(LOCAL_ABS)/outbox'"; \
	    echo "quarantine = '$(LOCAL_ABS)/quarantine'"; \
	    echo "archive = '$(LOCAL_ABS)/archive'"; \
	    echo "state_dir = '$(LOCAL_ABS)/state'"; \
	    grep -Eq '^api_key_file[[:space:]]*=' $(BASE_CONFIG) || \
	      echo "# The API key, one line; DROPCUT_API_KEY wins over it."; \
	    grep -Eq '^api_key_file[[:space:]]*=' $(BASE_CONFIG) || \
	      echo "api_key_file = '$(LOCAL_ABS)/api-key'"; \
	    echo; \
	    sed -E 's/^(inbox|outbox|quarantine|archive|state_dir)[[:space:]]*=/# (set above) &/' $(BASE_CONFIG); \
	  } > $@.tmp && cp $@.tmp $(LOCAL_WRITTEN) && mv $@.tmp $@ && echo "make: wrote $@"; \
	fi

# Runs the daemon in the foreground on LOCAL/{inbox,outbox,quarantine,archive}; Ctrl-C stops
# it (--take-terminal: the Ctrl-C reaches dropcut alone, so make ends without an error).
# Needs DROPCUT_API_KEY, or the key in LOCAL/api-key.
run: $(BIN)/dropcut $(LOCAL_CONFIG)
	@mkdir -p $(LOCAL_DIRS)
	$(BIN)/dropcut run --config $(LOCAL_CONFIG) --take-terminal

status: $(BIN)/dropcut $(LOCAL_CONFIG)
	@$(BIN)/dropcut status --config $(LOCAL_CONFIG)

# What `make run` would start with (the folders made as it makes them); the key redacted.
check: $(BIN)/dropcut $(LOCAL_CONFIG)
	@mkdir -p $(LOCAL_DIRS)
	@$(BIN)/dropcut check --config $(LOCAL_CONFIG)

# make retry FILES='var/quarantine/a.jpg b/c.jpg' (quarantined files: paths, or names
# relative to the inbox), or make retry ALL=1 for every quarantined file.
retry: $(BIN)/dropcut $(LOCAL_CONFIG)
	@if [ -z '$(FILES)$(ALL)' ]; then \
	  echo "usage: make retry FILES='var/quarantine/a.jpg …'  or  make retry ALL=1" >&2; exit 2; fi
	@$(BIN)/dropcut retry --config $(LOCAL_CONFIG) $(if $(ALL),--all) $(FILES)

# The spend guard on the local set-up: make budget, make budget RAISE=50, make resume,
# make approve [FOLDER=shoot], make discard [FOLDER=shoot].
budget: $(BIN)/dropcut $(LOCAL_CONFIG)
	@$(BIN)/dropcut budget --config $(LOCAL_CONFIG) $(if $(RAISE),raise $(RAISE))

resume approve discard: $(BIN)/dropcut $(LOCAL_CONFIG)
	@$(BIN)/dropcut $@ --config $(LOCAL_CONFIG) $(if $(filter-out resume,$@),$(FOLDER))

test: $(BIN)/dropcut
	$(BIN)/python -m pytest -q

lint: $(BIN)/dropcut
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy

bench: $(BIN)/dropcut
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow venv lint clean system-deps demo-deps
# Prerequisites in the order listed, also under -j: the system check comes before anything else.
.NOTPARALLEL:

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,testing]"
	@touch $(STAMP)

# System libraries (Debian/Ubuntu: installed when missing, as root or with password-less sudo;
# elsewhere one line says what to run). See scripts/system-deps.sh.
system-deps:
	@bash scripts/system-deps.sh

# A window needs Qt's xcb libraries (not Xvfb); the headless demo needs none.
demo-deps:
	@if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then bash scripts/system-deps.sh --window; fi

# With a display: napari with the plugin's widgets and the sample images.
# Without one: the same job headless (`microclf demo`).
demo: demo-deps $(STAMP)
	@if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
		$(BIN)/python -m napari_microclf._demo; \
	else \
		echo "No display found (DISPLAY is not set): running the headless demo, microclf demo."; \
		$(BIN)/microclf demo --out demo-output; \
	fi

# The whole suite but the tests marked slow (what cannot be made fast): about 15 minutes.
test: system-deps $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The slow tests alone (CI runs them after `make test`); pytest's 5 is "none selected".
test-slow: system-deps $(STAMP)
	$(BIN)/python -m pytest -m slow || [ $$? -eq 5 ]

lint: $(STAMP)
	$(BIN)/ruff check src tests bench docs scripts
	$(BIN)/ruff format --check src tests bench docs scripts

clean:
	rm -rf $(VENV) demo-output .pytest_cache

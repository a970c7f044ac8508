# The README's two commands. Plain pip with torch pinned in the same command keeps this box on the CPU wheel.
PY      ?= python3
VENV    ?= .venv
PIP      = $(VENV)/bin/pip
INSTALL  = $(PIP) install -q -e '.[all,dev]' torch==2.13.0
OUT     ?= demo-out

.PHONY: setup demo test test-matrix test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(INSTALL)
	touch $@

setup: $(VENV)/.installed

# The main job: `vlsi-edge demo` (synthesize the suite, SFT-only and VLsI students from the shipped pretrained tiny
# models, eval, export for jetson/onnx/phone, bench each bundle, report).
demo: setup
	$(VENV)/bin/vlsi-edge demo --out $(OUT)

# The default test tier (<= 10 minutes on 2 cores). pytest's exit 5 (no tests ran) is a failure.
test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

test-matrix: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m matrix

test-slow: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf $(VENV) $(OUT) build dist *.egg-info

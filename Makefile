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

# The main job: the most complete pipeline that exists today (becomes `vlsi-edge demo`): synthesize the suite,
# SFT the tiny student on the pretrain split, VLsI-distill it from the tiny teacher, score both on the test split,
# export the distilled student for ONNX Runtime and for Jetson (fp16), parity-gated, and verify a bundle.
DATA = $(OUT)/shapes
demo: setup
	$(VENV)/bin/vlsi-edge inspect --list
	$(VENV)/bin/vlsi-edge data synth --out $(DATA) --n-pretrain 5000 --n-train 1000 --n-val 100 --n-test 300 --overwrite
	$(VENV)/bin/vlsi-edge train --model builtin:tiny-qwen2vl-student --data $(DATA) --split pretrain \
		--steps 200 --out $(OUT)/pretrain-student --overwrite
	$(VENV)/bin/vlsi-edge distill --config tiny-qwen2vl --student $(OUT)/pretrain-student/student --data $(DATA) \
		--steps verbalize=20,interact=40,sft=40 --out $(OUT)/vlsi --overwrite
	$(VENV)/bin/vlsi-edge inspect --model $(OUT)/vlsi --verbalize --image $(DATA)/images/test/$$(ls $(DATA)/images/test | head -1) \
		--prompt "What colour is the triangle? Answer with one word."
	$(VENV)/bin/vlsi-edge eval --model $(OUT)/pretrain-student/student --data $(DATA) --split test \
		--out $(OUT)/preds-pretrained-student.json
	$(VENV)/bin/vlsi-edge eval --model $(OUT)/vlsi/student --data $(DATA) --split test --out $(OUT)/preds-vlsi-student.json
	$(VENV)/bin/vlsi-edge export --model $(OUT)/vlsi/student --target onnx --data $(DATA) --out $(OUT)/bundle-onnx \
		--overwrite
	$(VENV)/bin/vlsi-edge export --model $(OUT)/vlsi/student --target jetson --precision fp16 --data $(DATA) \
		--out $(OUT)/bundle-jetson-fp16 --overwrite
	$(VENV)/bin/vlsi-edge verify --bundle $(OUT)/bundle-onnx

# The default test tier (<= 10 minutes on 2 cores). pytest's exit 5 (no tests ran) is a failure.
test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

test-matrix: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m matrix

test-slow: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf $(VENV) $(OUT) build dist *.egg-info

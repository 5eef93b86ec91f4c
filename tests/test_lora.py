"""The row-indexed LoRA op and the one-pass forward, with PEFT and transformers as oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cold.decoding.engine import Engine
from cold.load.adapters import read_adapter
from cold.lora.layer import RowLoRALinear
from cold.lora.ops import lora_delta_gathered, lora_delta_reference, lora_delta_single
from cold.lora.routing import RowSelection
from cold.runner.rows import AMATEUR, EXPERT, RowLayout, RowSpec, left_pad
from conftest import ALL_LINEAR, make_lora


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    steps=st.integers(1, 4),
    adapters=st.integers(1, 3),
    rank=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_gathered_op_equals_reference(rows, steps, adapters, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, steps, 7, generator=gen)
    lora_a = torch.randn(adapters, rank, 7, generator=gen)
    lora_b = torch.randn(adapters, 5, rank, generator=gen)
    row_adapter = torch.randint(-1, adapters, (rows,), generator=gen)
    row_scale = torch.where(row_adapter >= 0, torch.rand(rows, generator=gen) * 2, torch.zeros(rows))
    expected = lora_delta_reference(x, lora_a, lora_b, row_adapter, row_scale)
    torch.testing.assert_close(lora_delta_gathered(x, lora_a, lora_b, row_adapter, row_scale), expected)
    only = torch.where(row_adapter >= 0, torch.zeros_like(row_adapter), row_adapter)  # one adapter + base rows
    torch.testing.assert_close(
        lora_delta_single(x, lora_a, lora_b, 0, torch.where(only >= 0, row_scale, torch.zeros_like(row_scale))),
        lora_delta_reference(x, lora_a, lora_b, only, row_scale),
    )
    assert torch.all(expected[row_adapter < 0] == 0)


@settings(max_examples=40, deadline=None)
@given(adapted=st.lists(st.booleans(), min_size=1, max_size=8), seed=st.integers(0, 10_000))
def test_layer_skips_rows_outside_the_adapted_span_exactly(adapted, seed):
    """Rows outside the layout's adapted span skip the LoRA; every row still equals the definition."""
    gen = torch.Generator().manual_seed(seed)
    specs = [RowSpec(i, EXPERT, 0 if a else -1, 1.5) for i, a in enumerate(adapted)]
    layout = RowLayout.build(specs, len(specs), "cpu")
    span = layout.adapted_span
    if any(adapted):
        assert adapted[span.start] and adapted[span.stop - 1] and not any(adapted[: span.start] + adapted[span.stop :])
    else:
        assert span.start == span.stop
    base = torch.nn.Linear(7, 5, bias=False)
    layer = RowLoRALinear(base, torch.randn(1, 3, 7, generator=gen), torch.randn(1, 5, 3, generator=gen), RowSelection())
    x = torch.randn(len(specs), 2, 7, generator=gen)
    layer.rows.set(layout.adapter, layout.scale, layout.single_adapter, span)
    with torch.no_grad():
        got, plain = layer(x), base(x)
    expected = plain + lora_delta_reference(x, layer.lora_a, layer.lora_b, layout.adapter, layer.rows.scale)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[~torch.tensor(adapted)], plain[~torch.tensor(adapted)])


def _rows_logits(engine: Engine, prompts: list[list[int]], specs: list[RowSpec]) -> torch.Tensor:
    """Last-position logits [R, V] of one engine forward pass over left-padded rows."""
    layout = RowLayout.build(specs, max(s.seq for s in specs) + 1, engine.device)
    ids, mask, pos = left_pad([prompts[s.seq] for s in specs], engine.pad_id, engine.device)
    with torch.no_grad():
        return engine.runner.logits(engine.runner.forward(layout, ids, mask, pos, cache=None), layout)


def _peft_last_logits(peft_model, prompt: list[int], adapter: str | None) -> torch.Tensor:
    with torch.no_grad():
        x = torch.tensor([prompt])
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(input_ids=x).logits[0, -1]
        peft_model.set_adapter(adapter)
        return peft_model(input_ids=x).logits[0, -1]


@pytest.mark.parametrize(
    "targets,rslora",
    [(ALL_LINEAR, False), (ALL_LINEAR, True), (("q_proj", "v_proj"), False), (("down_proj",), False)],
)
def test_tiny_expert_rows_equal_peft_and_amateur_rows_equal_base(tiny, tmp_path, targets, rslora):
    peft_model = make_lora(tiny.model, tmp_path / "lora", targets=targets, rslora=rslora, r=4, alpha=8)
    engine = Engine(tiny, [read_adapter(tmp_path / "lora")])
    assert {type(m) for m in engine.model.modules()} >= {RowLoRALinear}
    prompts = [[5, 17, 300, 42, 7], [900, 12], [77, 78, 79]]
    specs = [RowSpec(s, EXPERT, 0, 1.0) for s in range(3)] + [RowSpec(s, AMATEUR, -1, 0.0) for s in range(3)]
    logits = _rows_logits(engine, prompts, specs)
    for s, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[s], _peft_last_logits(peft_model, prompt, "default"), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[3 + s], _peft_last_logits(peft_model, prompt, None), rtol=1e-4, atol=1e-4)
    # The expert really differs from the base, so the comparison above means something.
    assert (logits[0] - logits[3]).abs().max() > 1e-2


def test_tiny_mixed_adapters_in_one_batch(tiny, tmp_path):
    """Two adapters of different ranks and targets, and base rows, in one forward pass."""
    first = make_lora(tiny.model, tmp_path / "a", r=4, alpha=8, seed=1)
    second = make_lora(tiny.model, tmp_path / "b", targets=("q_proj", "o_proj", "up_proj"), r=2, alpha=2, seed=2)
    engine = Engine(tiny, [read_adapter(tmp_path / "a"), read_adapter(tmp_path / "b")])
    prompts = [[5, 17, 300], [900, 12, 8, 9, 10], [77]]
    specs = [RowSpec(0, EXPERT, 1, 1.0), RowSpec(1, EXPERT, 0, 1.0), RowSpec(2, EXPERT, -1, 0.0), RowSpec(0, AMATEUR, 0, 1.0)]
    logits = _rows_logits(engine, prompts, specs)
    torch.testing.assert_close(logits[0], _peft_last_logits(second, prompts[0], "default"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], _peft_last_logits(first, prompts[1], "default"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[2], _peft_last_logits(first, prompts[2], None), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[3], _peft_last_logits(first, prompts[0], "default"), rtol=1e-4, atol=1e-4)


def test_scaled_expert_row_equals_peft_with_scaled_lora(tiny, tmp_path):
    """expert_scale multiplies the LoRA delta: compare with PEFT at lora_alpha times the factor."""
    make_lora(tiny.model, tmp_path / "x1", r=4, alpha=8, seed=3)
    scaled = make_lora(tiny.model, tmp_path / "x2", r=4, alpha=20, seed=3)  # same weights, 2.5x scale
    engine = Engine(tiny, [read_adapter(tmp_path / "x1")])
    logits = _rows_logits(engine, [[5, 6, 7]], [RowSpec(0, EXPERT, 0, 2.5)])
    torch.testing.assert_close(logits[0], _peft_last_logits(scaled, [5, 6, 7], "default"), rtol=1e-4, atol=1e-4)


def test_real_model_expert_and_amateur_rows_equal_peft(smollm2, tmp_path):
    peft_model = make_lora(smollm2.model, tmp_path / "lora", r=8, alpha=16, std=0.02)
    engine = Engine(smollm2, [read_adapter(tmp_path / "lora")])
    tok = smollm2.tokenizer
    prompts = [tok("The capital of France is").input_ids, tok("Natalia sold clips to 48 of her friends in April").input_ids]
    specs = [RowSpec(0, EXPERT, 0, 1.0), RowSpec(1, EXPERT, 0, 1.0), RowSpec(0, AMATEUR, -1, 0.0), RowSpec(1, AMATEUR, -1, 0.0)]
    logits = _rows_logits(engine, prompts, specs)
    for s, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[s], _peft_last_logits(peft_model, prompt, "default"), rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(logits[2 + s], _peft_last_logits(peft_model, prompt, None), rtol=1e-4, atol=2e-4)
    assert (logits[0] - logits[2]).abs().max() > 1e-2

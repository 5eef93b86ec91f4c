"""Contrastive LoRA Decoding (CoLD) for transformers' `generate` (a `custom_generate` method).

Each prompt runs twice in one batch through one model: its expert row with the LoRA adapter and
its amateur row without it (PEFT's mixed-adapter batches: `adapter_names` with "__base__" rows).
Each step scores every candidate token by how much the adapter raised it over the amateur, among
the tokens the expert finds plausible:

    valid(i) = s_e[i] >= log(alpha) + max_k s_e[k]
    score[i] = (1 + beta) s_e[i] - beta s_a[i]                  scoring="logit" (default)
    score[i] = log p_e[i] - beta / (1 + beta) log p_a[i]        scoring="logprob"

and picks the best (greedy) or samples from softmax(score / temperature) after top-k / top-p.
The model is a `PeftModel` (its active adapter is the expert, or `adapter_name=`), or a plain
model with `adapter="DIR"` (a PEFT LoRA directory, attached for the call and removed after).
Needs torch, transformers and peft only. Returns the token ids [batch, prompt + new], padded
after EOS with the pad token, as `generate` does.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, GenerationConfig

BASE_ROWS = "__base__"  # PEFT's adapter name for rows that run the base weights only
_NOT_OFFERED = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                "negative_prompt_ids", "negative_prompt_attention_mask")


def generate(model, input_ids: torch.LongTensor | None = None, attention_mask: torch.LongTensor | None = None,
             generation_config: GenerationConfig | None = None, streamer=None, alpha: float = 0.1, beta: float = 0.5,
             scoring: str = "logit", adapter: str | None = None, adapter_name: str | None = None, **kwargs):
    """CoLD decoding of a batch of (left-padded) prompts; the arguments `model.generate` takes, plus
    alpha, beta, scoring, and adapter (a PEFT directory for a plain model) or adapter_name."""
    input_ids = input_ids if input_ids is not None else kwargs.pop("inputs", None)
    for name in _NOT_OFFERED:
        if kwargs.get(name):
            raise ValueError(f"CoLD's generate does not take {name}")
    if input_ids is None:
        raise ValueError("give input_ids (the tokenised prompts)")
    if not 0 < alpha <= 1 or not 0 <= beta <= 100 or scoring not in ("logit", "logprob"):
        raise ValueError(f"alpha must be in (0, 1], beta in [0, 100], scoring logit or logprob; got {alpha}, {beta}, {scoring!r}")
    config = _config(model, generation_config, kwargs)
    attached = None
    if adapter is not None:
        from peft import PeftModel

        if _lora_layers(model):
            raise ValueError("adapter= is for a plain model; this one has a LoRA adapter already (use adapter_name=)")
        attached = PeftModel.from_pretrained(model, adapter, adapter_name="cold-expert")
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's adapted model
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("CoLD needs a LoRA adapter: call it on a PeftModel, or give adapter='DIR'")
    expert = adapter_name or layers[0].active_adapters[0]
    names = [expert] * input_ids.shape[0] + [BASE_ROWS] * input_ids.shape[0]  # expert rows, then amateur rows
    # PEFT's mixed-adapter batches: every LoRA layer is told which adapter each row uses
    hooks = [layer.register_forward_pre_hook(lambda module, args, kw: (args, {**kw, "adapter_names": names}),
                                             with_kwargs=True) for layer in layers]
    try:
        return _decode(model, input_ids, attention_mask, config, streamer, alpha, beta, scoring)
    finally:
        for hook in hooks:
            hook.remove()
        if attached is not None:
            attached.unload()  # the LoRA layers out again: the caller's model is as it was


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _config(model, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """The model's generation config, updated by `generation_config` and the keyword arguments."""
    config = GenerationConfig.from_dict({**model.generation_config.to_dict(),
                                         **(generation_config.to_dict() if generation_config else {})})
    unused = config.update(**{k: v for k, v in kwargs.items() if v is not None})
    unused = {k: v for k, v in unused.items() if k not in _NOT_OFFERED and k not in ("synced_gpus", "tokenizer")}
    if unused:
        raise ValueError(f"CoLD's generate does not know {', '.join(sorted(unused))}")
    if (config.num_beams or 1) > 1:
        raise ValueError("CoLD's generate decodes greedily or samples; beam search is not offered here")
    return config


@torch.no_grad()
def _decode(model, input_ids, attention_mask, config: GenerationConfig, streamer, alpha, beta, scoring):
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
    mask = torch.cat([attention_mask, attention_mask])  # [2B, T]: expert rows, then amateur rows
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=torch.cat([input_ids, input_ids]), attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True).logits[:, -1].float()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for _ in range(max_new):
        tokens = _pick(cold_score(logits[:batch], logits[batch:], alpha, beta, scoring), config)
        tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
        new_tokens.append(tokens)
        if streamer is not None:
            streamer.put(tokens.cpu())
        finished |= torch.isin(tokens, eos)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(2 * batch, 1)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=torch.cat([tokens, tokens])[:, None], attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits[:, -1].float()
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids


def cold_score(expert: torch.Tensor, amateur: torch.Tensor, alpha: float, beta: float, scoring: str = "logit") -> torch.Tensor:
    """[B, V] CoLD scores from expert and amateur logits [B, V]; -inf outside the plausibility mask."""
    valid = expert >= torch.log(torch.tensor(alpha, dtype=expert.dtype)) + expert.amax(dim=-1, keepdim=True)
    if scoring == "logit":
        score = (1 + beta) * expert - beta * amateur
    else:
        score = torch.log_softmax(expert, dim=-1) - beta / (1 + beta) * torch.log_softmax(amateur, dim=-1)
    return score.masked_fill(~valid, float("-inf"))


def _pick(score: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """The best token of each row, or one sampled from softmax(score / temperature) after top-k and top-p
    (torch's global generator: `torch.manual_seed` makes it reproducible)."""
    if not config.do_sample:
        return score.argmax(dim=-1)
    score = score / max(float(config.temperature or 1.0), 1e-5)
    if config.top_k:
        kth = score.topk(min(config.top_k, score.shape[-1]), dim=-1).values[:, -1:]
        score = score.masked_fill(score < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        ordered, order = score.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p
        drop[:, 0] = False
        score = score.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(score.softmax(dim=-1), 1).squeeze(-1)

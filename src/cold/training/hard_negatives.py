"""A multiple-choice expert's most tempting wrong choices: what a hard-negative anti-expert learns,
to serve as CoLD's amateur.

    ranked = rank_choices(model, tokenizer, problem, "chat")   # the choices' labels, the expert's favourite first
    negative = hard_negative(problem, ranked)                    # {"question", "answer", "worked"}

A choice is ranked by the answer the expert would write for it, `The answer is <choice text>.`,
after the prompt it was trained on: by the token that decides which choice greedy decoding writes
after `The answer is` or, where two choices start with that same token, by the summed
log-probability of the whole answer. The negative is the highest-ranked wrong choice, as one
example of the training format `cold.training.data.load_worked_examples` reads (the question
worded as `cold eval` words it, choices included).
"""

from __future__ import annotations

import torch

from cold.tasks.prompts import question_text
from cold.training.encoding import completion_ids, prompt_ids


def answer_text(choice: str) -> str:
    """The answer an expert trained on CommonsenseQA's text format writes for a choice."""
    return f"The answer is {choice}."


def answer_tokens(tokenizer, answers: list[str], prompt_format: str) -> tuple[list[list[int]], int]:
    """Each answer's tokens (its end left out), and how many first tokens all answers share (at
    least one token of each is left to tell them apart)."""
    completions = [completion_ids(tokenizer, a, prompt_format)[:-1] for a in answers]
    shared = 0
    while shared < min(len(c) for c in completions) - 1 and len({c[shared] for c in completions}) == 1:
        shared += 1
    return completions, shared


def deciding_token_scores(model, tokenizer, prompt: list[int], answers: list[str], prompt_format: str) -> list[float] | None:
    """Log-probability of each answer's first token after the shared ones (`The answer is`): the token
    that decides which choice greedy decoding writes. None where two answers share that token too.
    One forward pass, with logits at its last position only (a vocabulary-sized row per position is
    much of the cost)."""
    completions, shared = answer_tokens(tokenizer, answers, prompt_format)
    deciding = [c[shared] for c in completions]
    if len(set(deciding)) < len(deciding):
        return None
    logits = model(input_ids=torch.tensor([prompt + completions[0][:shared]]), logits_to_keep=1).logits[0, -1]  # [V]
    return torch.log_softmax(logits.float(), dim=-1)[deciding].tolist()


def choice_scores(model, tokenizer, prompt: list[int], answers: list[str], prompt_format: str) -> list[float]:
    """Summed log-probability of each answer's tokens (its end left out) after `prompt`. The prompt
    and the shared tokens run once, then the cache is repeated for the answers' own tokens."""
    completions, shared = answer_tokens(tokenizer, answers, prompt_format)
    head = model(input_ids=torch.tensor([prompt + completions[0][:shared]]), use_cache=True, logits_to_keep=shared + 1)
    cache = head.past_key_values
    cache.batch_repeat_interleave(len(answers))
    rests = [c[shared:] for c in completions]
    width = max(len(r) for r in rests)
    ids = torch.zeros((len(answers), width), dtype=torch.long)
    mask = torch.zeros((len(answers), len(prompt) + shared + width), dtype=torch.long)
    for row, rest in enumerate(rests):
        ids[row, : len(rest)] = torch.tensor(rest)
        mask[row, : len(prompt) + shared + len(rest)] = 1
    tail = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits  # [C, W, V]
    # answer token j is predicted by the head's position j (j <= shared) or by the tail's j - shared - 1
    logits = torch.cat([head.logits.expand(len(answers), -1, -1), tail[:, :-1]], dim=1).float()  # [C, shared + W, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[row, torch.arange(len(c)), torch.tensor(c)].sum().item() for row, c in enumerate(completions)]


def rank_choices(model, tokenizer, problem, prompt_format: str) -> list[str]:
    """A multiple-choice problem's labels, the one the expert (`model`, in inference mode) would
    answer first."""
    prompt = prompt_ids(tokenizer, question_text(problem), prompt_format)
    answers = [answer_text(text) for _, text in problem.choices]
    scores = (deciding_token_scores(model, tokenizer, prompt, answers, prompt_format)
              or choice_scores(model, tokenizer, prompt, answers, prompt_format))
    return [label for _, (label, _) in sorted(zip(scores, problem.choices), key=lambda pair: -pair[0])]


def hard_negative(problem, ranked: list[str]) -> dict:
    """The training example of the expert's highest-ranked wrong choice (`ranked`: `rank_choices`)."""
    wrong = next(label for label in ranked if label != problem.gold)
    choices = dict(problem.choices)
    return {"question": question_text(problem), "answer": choices[problem.gold], "worked": answer_text(choices[wrong])}

"""CoLD in lm-evaluation-harness: the model `cold`, registered with lm-eval when this module is imported.

    python -m cold.lm_eval --model cold \\
        --model_args model=smollm2,adapter=DIR,decoder=cold,alpha=0.1,beta=0.5 --tasks TASKS

`python -m cold.lm_eval` (or `cold lm-eval`) is lm-eval's own command line with the model
registered. Its model arguments:

    model            the base model: a built-in name, a Hugging Face directory or a .gguf file (smollm2)
    adapter          the PEFT LoRA adapter (the expert); none: the base model alone
    decoder          cold | expert | base: how generate_until decodes (cold)
    alpha, beta, scoring, beta_schedule, expert_scale       CoLD's settings (0.1, 0.5, logit, constant, 1)
    amateur_adapter, amateur_scale           an adapter as CoLD's amateur instead of the base model
    score            expert | cold: how loglikelihood scores a continuation (expert)
    penalty          score=cold: nats below the expert's log-probability for a token outside the plausible set (10)
    dtype, device, batch_size, max_length

Log-likelihoods (multiple choice, perplexity) are the adapted model's own log-probabilities by
default (`score=expert`); `score=cold` scores with CoLD: the log-softmax of the CoLD score over
the plausible set, and for a token outside it the expert's log-probability minus `penalty` rather
than -inf, so an answer with one implausible token is unlikely, not impossible
(`cold.sampling.scoring.cold_log_probs`).
"""

from __future__ import annotations

import json
import sys

from tqdm import tqdm

from cold.errors import ColdError

try:
    import lm_eval.models  # noqa: F401  lm-eval's own models first: it imports them only while its registry is empty
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:
    raise ColdError(f"lm-evaluation-harness is not installed: pip install 'cold-decoding[lm-eval]' ({exc})") from None
from cold.params import DECODERS, DecodeParams
from cold.sampling.scoring import OUTSIDE_PENALTY

SCORES = ("expert", "cold")
# generate_until keyword arguments of lm-eval tasks, and the DecodeParams field each sets
_GEN_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "do_sample": "do_sample"}


@register_model("cold")
class ColdLM(TemplateLM):
    """lm-eval's LM interface over `cold.decoding.engine.Engine`."""

    def __init__(self, model: str = "smollm2", adapter: str | None = None, decoder: str = "cold",
                 alpha: float = 0.1, beta: float = 0.5, scoring: str = "logit", beta_schedule: str = "constant",
                 expert_scale: float = 1.0, amateur_adapter: str | None = None, amateur_scale: float = 1.0, score: str = "expert",
                 penalty: float = OUTSIDE_PENALTY, dtype: str = "float32", device: str | None = "cpu",
                 batch_size: int | str = 8, max_length: int | None = None, max_batch_size: int | None = None,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise ColdError(f"unknown model_args for --model cold: {', '.join(sorted(unknown))}; known: model, adapter, "
                            "decoder, alpha, beta, scoring, beta_schedule, expert_scale, amateur_adapter, amateur_scale, score, "
                            "penalty, dtype, device, batch_size, max_length")
        if score not in SCORES:
            raise ColdError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if decoder not in DECODERS:
            raise ColdError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if decoder != "base" and adapter is None:
            raise ColdError(f"decoder={decoder} needs adapter=DIR (a PEFT LoRA adapter); decoder=base runs without one")
        if score == "cold" and adapter is None:
            raise ColdError("score=cold needs adapter=DIR (the expert of the CoLD score)")
        if amateur_adapter is not None and decoder != "cold":
            raise ColdError("amateur_adapter applies to decoder=cold")
        if not (isinstance(penalty, (int, float)) and 0 <= penalty < float("inf")):
            raise ColdError(f"penalty must be a finite number >= 0, got {penalty!r}")
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ColdError(f"batch_size must be >= 1, got {batch_size}")
        amateur = {} if amateur_adapter is None else {"amateur_adapter": "amateur", "amateur_scale": amateur_scale}
        self.params = DecodeParams(decoder=decoder, adapter="expert" if adapter else None, alpha=alpha, beta=beta,
                                   scoring=scoring, beta_schedule=beta_schedule, expert_scale=expert_scale,
                                   **amateur).validate()
        self.score = score
        self.penalty = float(penalty)
        from cold.decoding.engine import Engine  # torch: only once the model is asked for

        adapters = {"expert": adapter} if adapter else {}
        if amateur_adapter is not None:
            adapters["amateur"] = amateur_adapter
        # lm-eval's command line passes device "cuda:0" unless told otherwise: a GPU where there is one
        self.engine = Engine.load(model, adapters, device="auto" if device in ("cuda", "cuda:0") else device or "cpu",
                                  dtype=dtype)
        self.tokenizer = self.engine.tokenizer
        # a scored sequence is at most max_length + 1 tokens, and the engine keeps room for one more
        self._max_length = int(max_length) if max_length else self.engine.context_length - 2

    # ---- what lm-eval asks of a model --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS where the tokenizer has one, else EOS (as lm-eval's hf model)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each of its tokens is the best one), in request order."""
        sequences = [(list(context) + list(continuation))[-(self.max_length + 1):] for _, context, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))  # similar lengths share a batch
        params = self.params.with_(decoder=self.score if self.params.decoder != "base" else "base")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            scored = self.engine.logprobs([sequences[i] for i in batch], params, top=1, penalty=self.penalty,
                                          batch_size=self.batch_size)
            for i, one in zip(batch, scored):
                n = len(requests[i][2])
                chosen = one.token_logprobs[-n:]
                best = [top[0][0] for top in one.top_logprobs[-n - 1 : -1]]
                results[i] = (float(sum(chosen)), best == one.token_ids[-n:])
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts, in windows of max_length tokens (as lm-eval's hf model)."""
        totals = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (string,) = request.args
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scored = self._loglikelihood_tokens([(None, context, continuation) for context, continuation in windows],
                                                disable_tqdm=True)
            totals.append(sum(ll for ll, _ in scored))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context with the model's decoder until a stop string, EOS or max_gen_toks; batched
        by identical generation settings."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        texts: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            params = self._generation_params(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                contexts = [requests[i].args[0] for i in batch]
                for i, generation in zip(batch, self.engine.generate(contexts, params)):
                    texts[i] = generation.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, generation.text)
                bar.update(len(batch))
        bar.close()
        return texts

    def _generation_params(self, gen_kwargs: dict) -> DecodeParams:
        """DecodeParams of one task's generation settings (until, max_gen_toks, temperature, do_sample, top_p, top_k)."""
        settings = dict(gen_kwargs)
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        changes = {"stop": tuple(s for s in until if s),
                   "max_new_tokens": int(settings.pop("max_gen_toks", settings.pop("max_new_tokens", 256)))}
        for key in list(settings):
            if key not in _GEN_KWARGS:
                raise ColdError(f"generation setting {key}={settings[key]!r} is not one --model cold knows; "
                                f"known: until, max_gen_toks, {', '.join(_GEN_KWARGS)}")
            changes[_GEN_KWARGS[key]] = settings.pop(key)
        if not changes.get("temperature"):  # temperature 0 (or none given) means greedy, as in lm-eval's hf model
            changes.update(do_sample=False, temperature=1.0)
        return self.params.with_(**changes).validate()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`) with `--model cold` registered; a ColdError is one line, exit 2."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ColdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


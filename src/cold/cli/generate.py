"""`cold generate`: complete prompts with CoLD, the adapted model alone, or the base model alone.

Torch, transformers and vLLM are imported inside the functions that load a model, so that `cold --help` does not import them.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.text import Text

from cold.cli.common import (
    LLAMACPP_HELP,
    Device,
    Dtype,
    KvDtype,
    Model,
    check_positive,
    choose_amateur,
    err,
    load_engine,
    out,
    parse_adapter_specs,
    refuse_kv_dtype_on_vllm,
    reports_errors,
)
from cold.errors import ColdError
from cold.load.demo import default_adapters
from cold.params import BETA_SCHEDULES, DECODERS, SCORING_FORMS, DecodeParams, EngineName, amateur_fields

# the choices of --decoder, --scoring and --beta-schedule: the lists of cold.params
Decoder = Enum("Decoder", [(name, name) for name in DECODERS], type=str)
Scoring = Enum("Scoring", [(name, name) for name in SCORING_FORMS], type=str)
BetaSchedule = Enum("BetaSchedule", [(name, name) for name in BETA_SCHEDULES], type=str)


def read_prompts(prompts: list[str], input_file: Optional[Path], field: str) -> list[str]:
    """Prompts from arguments, a JSONL file (or `-` for stdin), or piped stdin lines."""
    found = list(prompts)
    if input_file is not None:
        handle = sys.stdin if str(input_file) == "-" else _open(input_file)
        try:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    found.append(_prompt_from_line(line, field, f"{input_file}:{number}"))
        except UnicodeDecodeError as exc:
            raise ColdError(f"--input {input_file}: not valid UTF-8 ({exc.reason})") from None
    elif not found and not sys.stdin.isatty():
        found = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not found:
        raise ColdError("no prompt given: pass PROMPT arguments, --input FILE.jsonl, or pipe prompts on stdin")
    return found


def _open(path: Path):
    if path.is_dir():
        raise ColdError(f"--input {path}: is a directory, not a JSONL file")
    if not path.is_file():
        raise ColdError(f"--input {path}: file not found")
    return path.open(encoding="utf-8")


def _prompt_from_line(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ColdError(f"{where}: not valid JSON ({exc.msg})") from exc
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return record[field]
    raise ColdError(f"{where}: expected a JSON string or an object with a string field {field!r}")


@reports_errors
def generate(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts to complete (or use --input, or pipe them on stdin, one per line).")] = None,
    model: Model = "smollm2",
    adapter: Annotated[Optional[list[str]], typer.Option(help="PEFT LoRA adapter as DIR or NAME=DIR (or a shipped adapter's name, e.g. smollm2-coin_flip-step-50); repeat for several. Default: the built-in demo adapter of a built-in model.")] = None,
    use: Annotated[Optional[str], typer.Option(help="Name of the adapter the expert uses when several are loaded.")] = None,
    decoder: Annotated[Decoder, typer.Option(help="cold: expert contrasted with base; expert: adapter alone; base: base model alone.")] = Decoder.cold,
    alpha: Annotated[Optional[float], typer.Option(help="CoLD plausibility threshold in (0, 1]: keep tokens with p >= alpha * max p of the expert. Default: the anti-expert's tuned setting, else 0.1.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="CoLD contrast strength >= 0 (0 = plain expert decoding). Default: the anti-expert's tuned setting, else 0.5.")] = None,
    scoring: Annotated[Optional[Scoring], typer.Option(help="logit: (1+beta)s_e - beta s_a; logprob: log p_e - beta/(1+beta) log p_a (Li et al.). Default: logit.")] = None,
    beta_schedule: Annotated[Optional[BetaSchedule], typer.Option(help="constant (default): beta at every step; entropy: beta times the expert's entropy over log V; jsd: beta times the Jensen-Shannon divergence of the expert's and the amateur's distributions over log 2 (the contrast fades where they agree).")] = None,
    expert_scale: Annotated[float, typer.Option(help="Multiply the adapter's LoRA scale on the expert (1 = as trained).")] = 1.0,
    amateur: Annotated[Optional[str], typer.Option(help="--decoder cold: the amateur, instead of the bare base model: a loaded adapter's name (--adapter NAME=DIR), or an adapter directory such as an anti-expert from `cold anti-expert` (its tuned alpha/beta become the defaults); 'base' for the base model. Default: a shipped adapter's tuned anti-expert where it has one, else the base model.")] = None,
    amateur_scale: Annotated[Optional[float], typer.Option(help="--decoder cold: LoRA scale on the amateur row: of --amateur's adapter (default 1), or, alone, of the expert's own adapter (default: no adapter, the base model).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many new tokens.")] = 128,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeat for several); not included in the output.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample from the score instead of taking the best token.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k best tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample among the best tokens holding this much probability.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for reproducible sampling.")] = None,
    num_beams: Annotated[int, typer.Option(help="Beam search with this many beams (1 = off).")] = 1,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the model's chat template (instruct models need it).")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is produced.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt (per event with --stream).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Print the expert's answer and CoLD's side by side, CoLD's tokens highlighted where it chose other than the expert would have at that point.")] = False,
    input_file: Annotated[Optional[Path], typer.Option("--input", help="JSONL file of prompts (strings or objects with --field); '-' for stdin.")] = None,
    field: Annotated[str, typer.Option(help="Field holding the prompt in --input objects.")] = "prompt",
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together in one batch.")] = 16,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    kv_dtype: KvDtype = None,
    engine_name: Annotated[EngineName, typer.Option("--engine", help="cold: this package's engine; " + LLAMACPP_HELP + "; vllm: CoLD pairs inside vLLM (pip install 'cold-decoding[vllm]'; docs/vllm.md).")] = EngineName.cold,
) -> None:
    """Complete prompts with CoLD, the adapted model alone, or the base model alone.

    Examples:

      cold generate --chat "What is 15% of 80?"

      cold generate --decoder expert --adapter my-lora/ --json -n 64 "Once upon a time"

      cat prompts.txt | cold generate --chat --stream --beta 0.25

      cold generate --adapter smollm2-coin_flip-step-50 --compare --chat "A coin is heads up. ..."  (its anti-expert is the amateur)

      cold generate --adapter runs/my-lora --amateur runs/my-anti-expert --chat "..."  (a pair from cold anti-expert)

      cold generate --adapter final=runs/mine --adapter early=runs/mine/step-100 --use final --amateur early "Q: ..."
    """
    if (amateur is not None or amateur_scale is not None) and decoder is not Decoder.cold:
        raise ColdError("--amateur and --amateur-scale apply to --decoder cold only")
    if compare and (as_json or stream or decoder is not Decoder.cold or num_beams > 1 or engine_name is EngineName.vllm):
        raise ColdError("--compare shows CoLD beside the expert: leave out --json, --stream, --num-beams, --decoder and --engine vllm")
    check_positive(batch_size=batch_size)
    texts = read_prompts(prompts or [], input_file, field)
    if adapter:
        adapters = parse_adapter_specs(adapter)
    else:  # the built-in demo adapter of a built-in model; the base model needs none
        adapters = {} if decoder is Decoder.base else default_adapters(model)
    pair, given_use = None, use
    if decoder is Decoder.cold:
        adapters, use, amateur, pair = choose_amateur(adapters, use, amateur, model)
    tuned = pair.setting if pair is not None else {}
    chosen = {"alpha": alpha, "beta": beta, "scoring": scoring.value if scoring else None,
              "beta_schedule": beta_schedule.value if beta_schedule else None}
    params = DecodeParams(
        decoder=decoder.value, adapter=use, expert_scale=expert_scale, **amateur_fields(amateur, amateur_scale),
        **{k: v if v is not None else tuned.get(k, getattr(DecodeParams, k)) for k, v in chosen.items()},
        do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, num_beams=num_beams, max_new_tokens=max_new_tokens, stop=tuple(stop or ()),
    ).validate()
    if pair is not None:
        err.print(f"[dim]amateur: the anti-expert {escape(pair.amateur_dir.name)} at {_setting_text(params)} (its tuned "
                  "setting where you give none); --amateur base contrasts with the base model[/]")
    if engine_name is EngineName.vllm:
        from cold.vllm.generator import VllmGenerator, check_supported

        check_supported(params, given_use, stream, device)
        refuse_kv_dtype_on_vllm(kv_dtype)
        with err.status(f"Starting vLLM with {model}" + (f" and adapter {', '.join(adapters)}" if adapters else "") + " …"):
            generator = VllmGenerator(model, adapters, dtype, amateur=params.amateur_adapter)
        try:
            _print_batches(generator, texts, params, chat, as_json, batch_size)
        finally:
            generator.close()
        return
    engine = load_engine(engine_name.value, model, adapters, device, dtype, kv_dtype)
    if compare:
        _print_comparisons(engine, texts, params, chat, batch_size)
    elif stream:
        _print_streams(engine, texts, params, chat, as_json)
    else:
        _print_batches(engine, texts, params, chat, as_json, batch_size)


def _print_batches(engine, texts, params, chat, as_json, batch_size) -> None:
    with Progress(console=err, transient=True, disable=len(texts) <= batch_size) as progress:
        task = progress.add_task("Generating", total=len(texts))
        for start in range(0, len(texts), batch_size):
            for g in engine.generate(texts[start : start + batch_size], params, chat=chat):
                if as_json:
                    out.print_json(json.dumps(_generation_record(g)), indent=None)
                else:
                    out.rule(f"[dim]{g.prompt}", align="left")
                    out.print(g.text, markup=False)
                    err.print(f"[dim]({len(g.token_ids)} tokens, finish_reason={g.finish_reason})")
                progress.advance(task)


def _print_streams(engine, texts, params, chat, as_json) -> None:
    for index, text in enumerate(texts):
        if not as_json:
            out.rule(f"[dim]{text}", align="left")
        for event in engine.stream([text], params, chat=chat):
            if as_json:
                record = {"index": index, "text": event.text, "token_ids": event.token_ids, "finish_reason": event.finish_reason}
                out.print_json(json.dumps(record), indent=None)
            else:
                out.print(event.text, end="", markup=False)
                if event.finish_reason:
                    out.print()
                    err.print(f"[dim](finish_reason={event.finish_reason})")


def _generation_record(g) -> dict:
    return {
        "prompt": g.prompt,
        "text": g.text,
        "token_ids": g.token_ids,
        "finish_reason": g.finish_reason,
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": len(g.token_ids),
    }


def _setting_text(params: DecodeParams) -> str:
    schedule = "" if params.beta_schedule == "constant" else f", beta schedule {params.beta_schedule}"
    form = "" if params.scoring == "logit" else f", {params.scoring} form"
    return f"alpha {params.alpha:g}, beta {params.beta:g}{form}{schedule}"


def _print_comparisons(engine, texts, params, chat, batch_size) -> None:
    """Each prompt's expert answer, then CoLD's with the tokens it chose against the expert's own first
    choice at that point highlighted (the expert's log-probabilities of CoLD's steps say which)."""
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        experts = engine.generate(batch, params.with_(decoder="expert"), chat=chat)
        colds = engine.generate(batch, params.with_(logprobs=1, logprob_score="expert"), chat=chat)
        for expert, cold in zip(experts, colds):
            changed = [e.top[0][0] != e.token_id for e in cold.logprobs]
            out.rule(f"[dim]{escape(cold.prompt)}", align="left")
            out.print(Text("expert: ", style="bold") + Text(expert.text))
            out.print(Text("CoLD:   ", style="bold") + highlighted(engine.tokenizer, cold.token_ids, changed, len(cold.text)))
            err.print(f"[dim](CoLD chose otherwise than the expert at {sum(changed)} of {len(changed)} tokens, highlighted; "
                      f"the texts {'agree' if expert.text == cold.text else 'differ'})")


def highlighted(tokenizer, token_ids: list[int], marks: list[bool], length: int) -> Text:
    """The decoded text of `token_ids`, cut at `length` characters (the answer without its stop string),
    with the pieces of the marked tokens in reverse video."""
    text, shown = Text(), ""
    for i, marked in enumerate(marks):
        whole = tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)
        if not whole.startswith(shown):  # a piece that completes a multi-byte character redraws it
            continue
        piece, shown = whole[len(shown):][: max(0, length - len(shown))], whole
        text.append(piece, style="reverse bold" if marked and piece.strip() else "")
    return text

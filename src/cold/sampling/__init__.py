"""From logits to text: pure CoLD scoring (`scoring`), the batch's sampling settings (`sampler`), finish
reasons (`stopping`) and the incremental detokeniser with stop strings (`detokenize`)."""

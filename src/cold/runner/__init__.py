"""The model runner (`model_runner.ModelRunner`): prefill into a `state.BatchState`, one decode step,
logits and CoLD scores. It alone touches the KV cache (`kvcache`), the attention mask and the
positions; `rows` lays out the expert and amateur rows, `llama_step` is the fused Llama decode step,
`attention` the grouped-query SDPA both paths use."""

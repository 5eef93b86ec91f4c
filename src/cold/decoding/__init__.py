"""The decode loops over the model runner — `running.RunningBatch` (greedy and sampling, continuous
batching) and `beam.beam_search` — and `engine.Engine`, the public facade that loads, checks and decodes."""

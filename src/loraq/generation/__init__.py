"""loraq's generation engine: one batched decode loop that generate, chat, eval, training-time exact match,
the preference demos (and a server, and online RL) all call.

* :mod:`~loraq.generation.sampling`: the decoding options and the next-token rule (greedy; temperature,
  top-k, top-p sampling from each row's own seeded generator).
* :mod:`~loraq.generation.engine`: the loop -- a preallocated KV cache for a left-padded batch, one prefill,
  then one step per token; stop tokens and stop strings; rows that finish leave the batch; rows may use
  different adapters (:mod:`loraq.lora.rows`).
* :mod:`~loraq.generation.text`: prompts in, text out (chat template, stop strings, streaming).

``transformers``' ``generate`` is not used here; it is the reference the tests hold this loop to.
"""

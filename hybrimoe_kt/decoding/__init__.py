"""Token generation pieces shared by ``chat``, ``ab`` and ``serve``: the sampler, the stop tokens, the
incremental detokenizer with stop strings, and the batched decode step over per-request KV caches."""

"""OpenAI-compatible HTTP server for hybrid models: ``protocol`` (requests, responses), ``generate`` (token
loop, sampler, detokenizer), ``engine`` (single worker, bounded queue), ``metrics``, ``app`` (HTTP)."""

"""vLLM generation: the offline engine, the OpenAI-server client, spec-decode counters."""

"""The SmolLM2 audio target: a real instruction-tuned LLM (SmolLM2-135M-Instruct) behind a small audio encoder
the project trains, in the Qwen2-Audio layout (README: "A real LLM target")."""

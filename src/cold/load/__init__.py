"""Everything that comes from disk: base models (Hugging Face directories, GGUF files, built-in names),
PEFT adapters, the built-in demo adapters, prompt encoding, and where caches and task data live."""

"""Writing adapters and models in formats other tools run (GGUF for llama.cpp / ollama)."""

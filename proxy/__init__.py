"""A lazy-loading OpenAI + Ollama proxy for local models."""

__version__ = "0.1.0"

"""innkeeper: a self-hosted LLM server for SillyTavern, OpenAI and KoboldAI clients."""

__version__ = "0.1.0"

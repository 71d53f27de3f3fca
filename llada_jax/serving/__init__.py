"""The OpenAI-compatible server: request protocol, batching engine, metrics and the ASGI app."""

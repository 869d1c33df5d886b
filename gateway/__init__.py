"""HTTP mode: an OpenAI-compatible aiohttp gateway in front of llama-server."""

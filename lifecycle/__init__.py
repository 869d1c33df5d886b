"""The shared core: settings, platform detection, provisioning, the llama-server supervisor, upstream client."""

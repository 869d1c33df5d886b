"""The shared core: settings, platform detection, provisioning, the backend facade (lifecycle.backend) over the
llama-server supervisor, the upstream client."""

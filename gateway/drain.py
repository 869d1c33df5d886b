"""The shutdown flag: set once SIGTERM/SIGINT arrives; read by both ports, both lanes and the probes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Drain:
    """Set once SIGTERM/SIGINT arrives: /health and the health port turn not-ready, new requests get 503."""

    draining: bool = False

"""The API surface: every llama-server route the gateway and the serverless handler serve, in one table.

A route not in this table never reaches llama-server, whatever the configuration (only PASSTHROUGH_ROUTES'
documented safe list, lifecycle.settings.passthrough_methods, opens a few read-only ones). In particular these are
never served: slot save/restore/erase (`/slots/<id>`), `POST /props`, `POST /lora-adapters`, `/tools` (the agent
tools, shell execution included), `/cors-proxy`, the router's `/models/load|unload` and `POST|DELETE /models`,
`/v1/stream` and `/v1/streams/lookup` (another client's stream, by a guessable id), `/v1/chat/completions/control`
(cuts another request's reasoning short, by its id), the Vertex AI routes.

Each route says:
- `shape`: the API it speaks, for its errors and its token usage: "openai" (chat, completions, embeddings, rerank,
  the llama.cpp routes), "responses" (OpenAI's Responses API), "anthropic" (Anthropic's Messages API: its own error
  shape, `x-api-key`).
- `feature`: the setting that must be on for the loaded model to serve it (EMBEDDINGS, RERANK), else None.
- `generates`: whether it generates tokens (and so may stream, and counts completion tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Shape = Literal["openai", "responses", "anthropic"]


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    shape: Shape = "openai"
    feature: str | None = None  # the Settings field (and variable) that must be on: "embeddings", "rerank"
    generates: bool = False


_TABLE = (
    Route("/v1/chat/completions", generates=True),
    Route("/v1/completions", generates=True),
    Route("/v1/embeddings", feature="embeddings"),
    Route("/v1/responses", "responses", generates=True),
    Route("/v1/responses/input_tokens", "responses"),
    Route("/v1/chat/completions/input_tokens"),
    Route("/v1/messages", "anthropic", generates=True),
    Route("/v1/messages/count_tokens", "anthropic"),
    Route("/v1/rerank", feature="rerank"),
    Route("/v1/reranking", feature="rerank"),
    Route("/rerank", feature="rerank"),
    Route("/reranking", feature="rerank"),
    Route("/tokenize"),
    Route("/detokenize"),
    Route("/apply-template"),
    Route("/infill", generates=True),
)
# POST routes whose body is a JSON object: admitted through the queue, streamed when the body says so.
JSON_ROUTES: dict[str, Route] = {route.path: route for route in _TABLE}
# The Settings field of each feature, and the variable that turns it on.
FEATURES = {"embeddings": "EMBEDDINGS", "rerank": "RERANK"}


def route_of(path: str) -> Route | None:
    return JSON_ROUTES.get(path)


def shape_of(path: str) -> Shape:
    route = JSON_ROUTES.get(path)
    return route.shape if route is not None else "openai"


def feature_missing(route: Route, settings: object) -> str | None:
    """Why the backend cannot serve `route` as configured (a 501 naming the setting to change), or None. The one
    rule of both HTTP lanes (gateway.pipeline) and of serverless mode (handler.worker)."""
    if route.feature is None or getattr(settings, route.feature, False):
        return None
    variable = FEATURES[route.feature]
    what = "embeddings" if route.feature == "embeddings" else "reranking"
    return (f"{route.path} needs a model started for {what}: set {variable}=true (llama-server's "
            f"--{'embeddings' if route.feature == 'embeddings' else 'rerank'}) and use a model made for it")

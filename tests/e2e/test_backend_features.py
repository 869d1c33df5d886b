"""EMBEDDINGS and RERANK with the real llama-server and the default model (SmolLM2-135M-Instruct, a chat model).

What llama-server does with this model (checked by these tests):
- EMBEDDINGS=true alone: /v1/embeddings answers 400 "Pooling type 'none' is not OAI compatible" (the model has no
  pooling of its own), so the test adds EXTRA_ARGS="--pooling mean", as docs/CONFIGURATION.md says. Chat still
  answers.
- RERANK=true: it loads (llama.cpp only warns "model default pooling_type is [-1], but [4] was specified"), and
  /v1/rerank answers 200 with one relevance_score per document; without a classifier head the score is one
  component of a hidden state, so it means nothing, and the test asserts only the shape.
"""

from __future__ import annotations

from pathlib import Path

import requests

from tests.conftest import Gateway

DOCUMENTS = ["The giant panda is a bear species endemic to China.", "Paris is the capital of France."]


def backend_args(gw: Gateway) -> list[str]:
    (backend,) = gw.backend_pids()
    return Path(f"/proc/{backend}/cmdline").read_text().rstrip("\0").split("\0")


def backend_key(gw: Gateway) -> str:
    (backend,) = gw.backend_pids()
    raw = Path(f"/proc/{backend}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)["LLAMA_API_KEY"]


def test_embeddings_on(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"EMBEDDINGS": "true", "EXTRA_ARGS": "--pooling mean"}, name="embeddings")
    args = backend_args(gw)
    assert "--embeddings" in args and args[-2:] == ["--pooling", "mean"]
    reply = requests.post(f"{gw.url}/v1/embeddings", json={"model": "any", "input": "hello world"}, timeout=60)
    assert reply.status_code == 200, reply.text
    vector = reply.json()["data"][0]["embedding"]
    assert len(vector) == 576 and any(vector)  # SmolLM2-135M's hidden size
    chat = requests.post(f"{gw.url}/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"], chat.text


def test_rerank_on_loads_and_answers_with_a_chat_model(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"RERANK": "true"}, name="rerank")
    assert "--rerank" in backend_args(gw)
    body = {"model": "any", "query": "What is a panda?", "documents": DOCUMENTS}
    # llama-server itself, asked with the per-boot key: what the model does with --rerank.
    direct = requests.post(f"http://127.0.0.1:{gw.port_backend}/v1/rerank", json=body, timeout=60,
                           headers={"Authorization": f"Bearer {backend_key(gw)}"})
    assert direct.status_code == 200, direct.text
    results = direct.json()["results"]
    assert sorted(item["index"] for item in results) == [0, 1]
    assert all(isinstance(item["relevance_score"], float) for item in results)
    # Through the gateway (lifecycle.routes serves /v1/rerank when RERANK is on): the same answer's shape.
    reply = requests.post(f"{gw.url}/v1/rerank", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert sorted(item["index"] for item in reply.json()["results"]) == [0, 1]

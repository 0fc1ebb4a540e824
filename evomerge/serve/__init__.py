"""`evomerge serve`: the reference Language-Model-as-a-Service provider over a repository of experts.

    EVOMERGE_API_KEY=... evomerge serve --repository DIR --port 8000 --api-key-env EVOMERGE_API_KEY

OpenAI-compatible routes, each accepting a `merge` object (a `MergeRecipe` dict; the `openai`
client sends it with ``extra_body={"merge": recipe.to_dict()}``):
- GET  /v1/models: the base and every expert (an expert's name as `model` answers with it alone);
- POST /v1/completions: `echo` + `logprobs` + `max_tokens` 0 returns the prompt's token logprobs,
  which is how the api backend scores answers with the labels kept on the client;
- POST /v1/chat/completions: the model's chat template (422 without one); `echo` +
  `continue_final_message` + `logprobs` score a final assistant message (vLLM's extensions);
- POST /v1/sessions, POST /v1/sessions/{id}/evaluate, DELETE /v1/sessions/{id}: the paper's
  protocol (examples uploaded once, then α/β in, loss out);
- GET /v1/stats: merges (one per distinct recipe while the LRU cache holds it), cache hits, batches;
- GET /openapi.json, /docs: the schema.
Bad input is answered 401 / 413 / 422 / 404 in OpenAI's error shape and never stops the server.
Heavy parts (FastAPI, torch) load only when a server is built; `serving` is the embedded default.
"""

from evomerge.serve.protocol import Limits

__all__ = ["Limits", "create_app", "serving"]


def __getattr__(name: str):
    if name == "create_app":
        from evomerge.serve.app import create_app

        return create_app
    if name == "serving":
        from evomerge.serve.embedded import serving

        return serving
    raise AttributeError(f"module 'evomerge.serve' has no attribute {name!r}")

"""`evomerge serve`: the reference Language-Model-as-a-Service provider over a repository of experts.

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

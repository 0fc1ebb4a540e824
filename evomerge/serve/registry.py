"""Merges the provider keeps as models of their own: the black-box user's way to deploy a found merge.

POST /v1/models          {id, merge}  -> the new model (then listed by GET /v1/models)
DELETE /v1/models/{id}                -> {id, deleted}
A registered id answers /v1/completions and /v1/chat/completions with no `merge` in the body,
exactly as its recipe sent in the body would (the same recipe key, so the same cached merge).
Registrations are kept in a small JSON file (written whole and renamed into place), so they
survive a restart of `evomerge serve`. Only the recipe is stored and returned, never weights.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError, RecipeError
from evomerge.recipe import MergeRecipe
from evomerge.serve.host import ModelHost
from evomerge.serve.protocol import Limits
from evomerge.serve.schemas import ApiError, parse_merge

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the new model id (letters, digits, . _ : -; at most 128)")
    merge: dict[str, Any] = Field(description="the MergeRecipe this model serves")


class ModelRegistry:
    """Named recipes, kept in `path` (None: in memory only, as for the embedded server)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._models: dict[str, tuple[MergeRecipe, int]] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self._models = {name: (MergeRecipe.from_dict(entry["merge"]), int(entry["created"]))
                                for name, entry in data["models"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecipeError) as exc:
                raise ConfigError(f"registered models file {self.path} is unreadable ({exc}); "
                                  "fix or remove it") from None

    def get(self, name: str | None) -> MergeRecipe | None:
        entry = self._models.get(name) if name is not None else None
        return None if entry is None else entry[0]

    def listing(self) -> list[tuple[str, int]]:
        """(id, created) of every registered model, oldest first."""
        return sorted(((n, c) for n, (_, c) in self._models.items()), key=lambda e: (e[1], e[0]))

    def add(self, name: str, recipe: MergeRecipe) -> int:
        with self._lock:
            created = int(time.time())
            self._models[name] = (recipe, created)
            self._save()
            return created

    def remove(self, name: str) -> bool:
        with self._lock:
            if self._models.pop(name, None) is None:
                return False
            self._save()
            return True

    def _save(self) -> None:
        if self.path is None:
            return
        data = {"models": {n: {"merge": r.to_dict(), "created": c} for n, (r, c) in self._models.items()}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.path)


def add_model_routes(app: Any, host: ModelHost, registry: ModelRegistry, limits: Limits) -> None:
    """Register and delete provider-side models on `app` (auth is the app's own, as for every route)."""

    @app.post("/v1/models")
    async def register(req: RegisterRequest) -> dict[str, Any]:
        """Keep `merge` as the model `id`: listed, and answering completions with no `merge` body."""
        if not _ID.match(req.id):
            raise ApiError(422, f"id {req.id!r}: use letters, digits and . _ : - (at most 128)", "id")
        if req.id == host.base_name or req.id in host.experts or registry.get(req.id) is not None:
            raise ApiError(409, f"model {req.id!r} already exists; choose another id (or DELETE it first)", "id",
                           "model_exists")
        recipe = parse_merge(req.merge, None, host, limits)
        if recipe is None:
            raise ApiError(422, "merge: give a recipe to register", "merge")
        created = registry.add(req.id, recipe)
        return {"id": req.id, "object": "model", "created": created, "owned_by": "evomerge", "kind": "merge"}

    @app.delete("/v1/models/{model_id}")
    async def unregister(model_id: str) -> dict[str, Any]:
        """Remove a registered merge (the base and the experts cannot be removed)."""
        if not registry.remove(model_id):
            raise ApiError(404, f"model {model_id!r} is not a registered merge; GET /v1/models lists them",
                           "model", code="model_not_found")
        return {"id": model_id, "object": "model", "deleted": True}

"""Request bodies of the provider's API (pydantic), and the check that turns a `merge` dict into a recipe.

Unknown top-level fields are ignored, as OpenAI-compatible servers do, so clients may send
OpenAI options the reference server does not use. `merge` is checked strictly: a bad recipe is a
422 whose ``param`` names the offending field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import RecipeError
from evomerge.recipe import MergeRecipe
from evomerge.serve.host import ModelHost
from evomerge.serve.protocol import Limits


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code, self.headers = code, headers


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1, description="sampling seed (a 64-bit integer)")]
"""A seed torch accepts: a larger one made `torch.manual_seed` raise (a 500) before this bound."""


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    seed: Seed | None = None
    merge: dict[str, Any] | None = Field(None, description="a MergeRecipe dict; without one the model named answers")


class ChatMessage(_Body):
    role: str
    content: str


class ChatRequest(_Body):
    """OpenAI chat completions, with vLLM's extensions for scoring a final assistant message:
    ``echo`` + ``continue_final_message`` (+ ``add_generation_prompt`` false) and ``max_tokens`` 0
    return that message's token logprobs (`evomerge.serve.protocol`'s rule after the templated prompt)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    n: int = Field(1, ge=1, le=1)
    seed: Seed | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    merge: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    """POST /tokenize as vLLM takes it (``prompt`` or ``messages``), or llama.cpp (``content``)."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class SessionExample(_Body):
    prompt: str
    answer: str = Field(min_length=1)
    id: str | None = None


class SessionRequest(_Body):
    """Open a merge session: the experts to merge and the examples to score, uploaded once."""

    experts: list[str] = Field(min_length=1)
    examples: list[SessionExample] = Field(min_length=1)
    method: Literal["evo", "evo_tv"] = "evo"


class SessionEvaluateRequest(_Body):
    """One query of the paper's protocol: α (keep ratios) and β (signed scales), or a full recipe."""

    alpha: list[float] | None = None
    beta: list[float] | None = None
    merge: dict[str, Any] | None = None


def parse_merge(data: dict[str, Any] | None, model: str | None, host: ModelHost, limits: Limits) -> MergeRecipe | None:
    """The recipe a request asks for (None: the base model), or ApiError 422/404 naming the field."""
    if data is None:
        if model is None or model == host.base_name:
            return None
        if model in host.experts:
            return MergeRecipe("task_arithmetic", (model,), (1.0,))
        raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists the base and the experts",
                       "model", code="model_not_found")
    try:
        recipe = MergeRecipe.from_dict(data)
    except RecipeError as exc:
        raise ApiError(422, f"merge: {exc}", "merge") from None
    check_bounds(recipe, limits)
    try:
        host.check(recipe)
    except RecipeError as exc:
        raise ApiError(422, str(exc), "merge") from None
    return recipe


def check_bounds(recipe: MergeRecipe, limits: Limits) -> None:
    """Coefficients beyond the provider's bounds are refused (|β| ≤ 1.5 by default, as in the paper)."""
    if abs(recipe.scale) > limits.max_abs_scale:
        raise ApiError(422, f"merge.scale is {recipe.scale}; it must lie in [-{limits.max_abs_scale}, "
                            f"{limits.max_abs_scale}]", "merge.scale")
    groups = [("merge.weights", recipe.weights),
              *((f"merge.blocks[{b.name}].weights", b.weights) for b in recipe.blocks)]
    for name, weights in groups:
        for i, w in enumerate(weights):
            if abs(w) > limits.max_abs_weight:
                raise ApiError(422, f"{name}[{i}] is {w}; weights must lie in [-{limits.max_abs_weight}, "
                                    f"{limits.max_abs_weight}]", f"{name}[{i}]")

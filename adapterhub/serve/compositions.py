"""Compositions over HTTP: a generation's `composition` field (ours), LoRAX's `merged_adapters` mapped
onto it, and compositions registered as model names (`POST /v1/compositions`).

    {"model": "<base>", "prompt": "...",
     "composition": {"adapters": [{"name": "support", "weight": 0.7}, {"name": "legal", "weight": 0.3}],
                     "method": "ties", "density": 0.5}}

A key must be allowed every adapter a composition combines (and the composition's own name, for a
registered one); one that is not is answered as an unknown model (404), as for plain adapters.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..backbone import Composition
from ..errors import AdapterError
from .access import Access
from .errors import ApiError
from .fields import Text
from .openapi import ERROR_RESPONSES

MAX_INPUTS = 16


class ComposedAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text = Field(min_length=1, max_length=256)
    weight: float = 1.0


class CompositionSpec(BaseModel):
    """A weighted combination of adapters; the methods and options are PEFT's add_weighted_adapter's
    (bottleneck adapters: adapters' average_adapter). method null: the adapters' type's default
    ("cat" for LoRA, "linear" for IA3 and bottleneck)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    adapters: list[ComposedAdapter] = Field(min_length=1, max_length=MAX_INPUTS)
    method: Text | None = Field(None, min_length=1, max_length=64)
    density: float | None = Field(None, ge=0, le=1)
    majority_sign_method: Literal["total", "frequency"] | None = None
    svd_rank: int | None = Field(None, ge=1, le=65536)
    svd_clamp: float | None = Field(None, gt=0, le=1)
    svd_full_matrices: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    normalize_weights: bool | None = None

    def composition(self, field: str) -> Composition:
        """The Composition, or a 400 naming `field` and what is wrong."""
        spec = self.model_dump(exclude_none=True, exclude={"name"})
        try:
            return Composition.parse(spec, field)
        except AdapterError as error:
            raise ApiError(400, str(error), field) from None


class MergedAdapters(BaseModel):
    """LoRAX's `merged_adapters`: `ids` combined with `weights` (default 1 each) by `merge_strategy`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[Text] = Field(min_length=1, max_length=MAX_INPUTS)
    weights: list[float] | None = Field(None, min_length=1, max_length=MAX_INPUTS)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float | None = Field(None, ge=0, le=1)
    majority_sign_method: Literal["total", "frequency"] = "total"

    def composition(self) -> Composition:
        weights = self.weights or [1.0] * len(self.ids)
        if len(weights) != len(self.ids):
            raise ApiError(
                400, f"merged_adapters has {len(self.ids)} ids but {len(weights)} weights", "merged_adapters.weights"
            )
        spec = {
            "adapters": [{"name": n, "weight": w} for n, w in zip(self.ids, weights)],
            "method": self.merge_strategy,
            "majority_sign_method": self.majority_sign_method,
        }
        if self.density is not None:
            spec["density"] = self.density
        try:
            return Composition.parse(spec, "merged_adapters")
        except AdapterError as error:
            raise ApiError(400, str(error), "merged_adapters") from None


class CompositionUpload(CompositionSpec):
    """POST /v1/compositions: `name` becomes a model name that runs this composition."""

    name: Text = Field(min_length=1, max_length=256, pattern=r"^[^#@/\s\x00]+$")


def requested(body, base_name: str) -> Composition | None:
    """The composition a generation asks for inline (`composition`, or LoRAX's `merged_adapters`), or
    None. Its `model` must then be the base model, which the composition's adapters are applied to."""
    given = [f for f in ("composition", "merged_adapters") if getattr(body, f) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ApiError(400, "give either composition or merged_adapters, not both", "merged_adapters")
    if body.model != base_name:
        raise ApiError(
            400,
            f"{given[0]} combines adapters on the base model: send model {base_name!r} (not {body.model!r}), "
            "or register the composition as a model with POST /v1/compositions",
            "model",
        )
    if body.composition is not None:
        return body.composition.composition("composition")
    return body.merged_adapters.composition()


async def authorize(access: Access, request: Request, backend, model: str, composition: Composition | None):
    """The key may use `model` and every adapter the composition (inline, or registered as `model`) combines."""
    access.authorize(request, model)
    if composition is None:
        composition = (await backend.compositions()).get(model)
    for name in () if composition is None else composition.names:
        access.authorize(request, name)


def add_routes(app: FastAPI, backend, access: Access) -> None:
    @app.post("/v1/compositions", status_code=201, responses=ERROR_RESPONSES[400, 401, 403, 404, 413])
    async def add_composition(upload: CompositionUpload, request: Request):
        """Registers a composition as the model `name` (replacing one of that name); admin only."""
        access.authorize(request, None)
        composition = upload.composition("body")
        await backend.add_composition(upload.name, composition)
        return composition_json(upload.name, composition)

    @app.get("/v1/compositions", responses=ERROR_RESPONSES[401, 403])
    async def list_compositions(request: Request):
        access.authorize(request, None)
        listing = sorted((await backend.compositions()).items())
        return {"object": "list", "data": [composition_json(n, c) for n, c in listing]}

    @app.delete("/v1/compositions/{name}", responses=ERROR_RESPONSES[401, 403, 404])
    async def delete_composition(name: str, request: Request):
        access.authorize(request, None)
        await backend.remove_composition(name)
        return JSONResponse({"id": name, "object": "composition", "deleted": True})


def composition_json(name: str, composition: Composition) -> dict:
    return {"id": name, "object": "composition", **composition.to_json()}

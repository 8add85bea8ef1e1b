"""The served OpenAPI document: FastAPI's, completed with what only the running service knows.

A Pydantic model cannot say which signal sets the bundle holds, what shape its tensors take or how
many images a batch may carry; a schema-driven client (or fuzzer) that does not know them sends
requests the server must refuse. Once the bundle is loaded the document states:

- the signal set and operating point names (query, JSON and multipart) as enums;
- a tensor as ``C x H x W`` (or ``1 x C x H x W``) nested arrays of the bundle's input shape, with
  values within ``MAX_TENSOR_ABS`` (the server refuses anything else);
- base64 images as ``contentEncoding: base64`` strings (of a PNG or JPEG file), multipart files as
  PNG or JPEG parts;
- batch lists holding 1 to ``max_images_per_request`` entries (413 beyond);
- ``X-Request-ID`` on every response, ``Retry-After`` on the predict routes' 429 and 503.

Until the bundle is loaded the generic document is served and not cached.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI

from service.parsing import MAX_TENSOR_ABS
from service.settings import Settings
from service.state import ServiceState

_REQUEST_ID_HEADER = {
    "description": (
        "the request this answers: the client's X-Request-ID when it is a plain token, else a fresh id"
    ),
    "schema": {"type": "string"},
}
_RETRY_AFTER_HEADER = {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}


def tensor_schema(shape: tuple[int, int, int] | None) -> dict[str, Any]:
    """One tensor: ``C x H x W`` or ``1 x C x H x W`` nested arrays of numbers within ``MAX_TENSOR_ABS``."""
    number = {"type": "number", "minimum": -MAX_TENSOR_ABS, "maximum": MAX_TENSOR_ABS}
    if shape is None:
        nested: dict[str, Any] = number
        for _ in range(3):
            nested = {"type": "array", "items": nested}
        return nested
    chw: dict[str, Any] = number
    for size in reversed(shape):
        chw = {"type": "array", "items": chw, "minItems": int(size), "maxItems": int(size)}
    return {"anyOf": [chw, {"type": "array", "items": chw, "minItems": 1, "maxItems": 1}]}


def image_string_schema() -> dict[str, Any]:
    return {
        "type": "string",
        "contentEncoding": "base64",
        "description": "base64 of a PNG or JPEG file (a data: URL prefix is allowed)",
    }


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            yield path, operation


def _string_branch(schema: dict[str, Any], change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Replace the non-null branch of an ``anyOf [X, null]`` (Pydantic's optional field), or ``schema``."""
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        schema["anyOf"] = [b if b.get("type") == "null" else change(b) for b in branches]
    else:
        replaced = change(schema)
        schema.clear()
        schema.update(replaced)


def _refine_fields(properties: dict[str, Any], names: dict[str, list[str]], shape: Any, limit: int) -> None:
    for field, values in names.items():
        if field in properties and values:
            _string_branch(
                properties[field], lambda b, values=values: {**b, "type": "string", "enum": values}
            )
    if "image" in properties:
        _string_branch(properties["image"], lambda _: image_string_schema())
    if "tensor" in properties:
        _string_branch(properties["tensor"], lambda _: tensor_schema(shape))
    many = {"images": image_string_schema(), "tensors": tensor_schema(shape)}
    for field, item in many.items():
        if field in properties:
            _string_branch(
                properties[field], lambda b, item=item: {**b, "items": item, "minItems": 1, "maxItems": limit}
            )
    for field in ("file", "files"):
        if properties.get(field, {}).get("type") == "array":
            properties[field]["maxItems"] = limit


def refine(
    doc: dict[str, Any],
    shape: tuple[int, int, int] | None,
    names: dict[str, list[str]] | None,
    settings: Settings,
) -> None:
    """Complete ``doc`` in place (see the module docstring); ``shape`` / ``names`` None: not loaded yet."""
    limit = settings.max_images_per_request
    names = names or {}
    for path, operation in _operations(doc):
        predict = path.startswith(("/predict", "/explain"))  # the routes behind auth and the rate limit
        for status, response in operation.get("responses", {}).items():
            headers = response.setdefault("headers", {})
            headers["X-Request-ID"] = _REQUEST_ID_HEADER
            if predict and status in ("429", "503"):
                headers["Retry-After"] = _RETRY_AFTER_HEADER
        for parameter in operation.get("parameters", []):
            values = names.get(parameter.get("name", "")) if parameter.get("in") == "query" else None
            if values:
                _string_branch(
                    parameter["schema"], lambda b, values=values: {**b, "type": "string", "enum": values}
                )
        for media in operation.get("requestBody", {}).get("content", {}).values():
            schema = media.get("schema", {})
            properties = schema.get("properties")
            if isinstance(properties, dict):
                _refine_fields(properties, names, shape, limit)
                _refine_branches(schema, properties)


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _refine_branches(schema: dict[str, Any], properties: dict[str, Any]) -> None:
    """A ``oneOf`` branch that requires a field (``{"required": ["image"], "properties": {"image":
    {"type": "string"}}}``) carries that field's full definition, so a value drawn for it is one the
    server reads (a generator may draw from the branch alone)."""
    for branch in schema.get("oneOf", []):
        for name, sub in branch.get("properties", {}).items():
            if sub.get("type") != "null" and name in properties:
                branch["properties"][name] = _non_null(properties[name])


def _refine_review_label(doc: dict[str, Any], n_classes: int) -> None:
    """A review's ``label`` is a class index of the loaded bundle: the document says up to which."""
    schema = doc.get("components", {}).get("schemas", {}).get("ReviewLabel", {})
    labels = [schema.get("properties", {}).get("label", {})]
    labels += [branch.get("properties", {}).get("label", {}) for branch in schema.get("oneOf", [])]
    for label in labels:
        for branch in label.get("anyOf", [label]):
            if branch.get("type") == "integer":
                branch["maximum"] = n_classes - 1


def bundle_names(state: ServiceState) -> dict[str, list[str]] | None:
    """The signal set names the loaded gate serves and every operating point name they hold."""
    if state.loaded is None:
        return None
    sets = state.loaded.gate.signal_sets
    points = sorted({name for chosen in sets.values() for name in chosen.operating_points})
    return {"signal_set": sorted(sets), "operating_point": points}


def install_openapi(app: FastAPI, state: ServiceState) -> None:
    """Serve the completed document from ``app.openapi()`` (and so ``/openapi.json``)."""
    generate = app.openapi
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" in cached:
            return cached["doc"]  # type: ignore[no-any-return]
        app.openapi_schema = None
        doc = copy.deepcopy(generate())
        names = bundle_names(state)
        shape = tuple(state.loaded.bundle.input_shape) if state.loaded is not None else None
        refine(doc, shape, names, state.settings)  # type: ignore[arg-type]
        if state.loaded is not None:
            _refine_review_label(doc, len(state.loaded.bundle.class_names))
        app.openapi_schema = doc
        if names is not None:
            cached["doc"] = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]

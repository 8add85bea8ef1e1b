"""Reading a predict request's body (JSON, multipart or a raw image) into normalised tensors and options.

The content type decides the form: ``application/json`` (base64 images or tensors),
``multipart/form-data`` (files ``file`` / ``files`` plus option fields), or a raw ``image/png`` /
``image/jpeg`` body. Decoding runs in a worker thread so large images do not stall the event loop.
"""

from __future__ import annotations

import io
import json
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from models.errors import InputError
from models.image_input import decode_base64, decode_image, tensor_from_json
from service.errors import TooManyImages, UnsupportedMediaType
from service.schemas import BatchJSON, PredictJSON, PredictOptions
from service.state import LoadedService

_OPTION_FIELDS = tuple(PredictOptions.model_fields)
EMPTY_BODY = (
    'empty body: send a multipart file field \'file\', JSON {"image": <base64>} or {"tensor": [...]}, '
    "or a raw image/png or image/jpeg body"
)


@dataclass
class ParsedRequest:
    """``x`` is ``N x C x H x W`` normalised; ``options`` the body's options (unset ones are None)."""

    x: torch.Tensor
    options: PredictOptions
    blobs: list[bytes] | None = None
    """The encoded images as received (one per row of ``x``); None when the body held tensors, which
    ``x`` then is. Kept by reference only: the fallback item of an ``unknown`` is built from it."""

    def original(self, index: int) -> tuple[bytes, str]:
        """Image ``index`` as received and its media type: the encoded bytes, or for a tensor its
        values as a float32 ``.npy`` file. Computed only for an image that goes to the fallback."""
        if self.blobs is None:
            buffer = io.BytesIO()
            np.save(buffer, self.x[index].numpy().astype(np.float32), allow_pickle=False)
            return buffer.getvalue(), "application/x-npy"
        blob = self.blobs[index]
        if blob.startswith(b"\x89PNG"):
            return blob, "image/png"
        if blob.startswith(b"\xff\xd8"):
            return blob, "image/jpeg"
        return blob, "application/octet-stream"


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


MAX_INT_DIGITS = 64
"""Longest integer literal read from JSON: Python refuses > 4300 digits with a ValueError, and any
integer past float range would only become an infinite pixel."""


def _charset(request: Request) -> str | None:
    for part in request.headers.get("content-type", "").split(";")[1:]:
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a key given twice is refused (parsers disagree on which one wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InputError(f"JSON object has the key {key!r} twice; send each field once")
        out[key] = value
    return out


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise InputError(f"JSON integer literal with {digits} digits, more than {MAX_INT_DIGITS}")
    return int(text)


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 (a BOM is skipped, RFC 8259 allows it), no duplicate keys, bounded integer
    literals and nesting (Python's parser raises RecursionError ~1000 levels down). NaN/Infinity
    literals are read, so such tensors reach the check that names them."""
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"body is not valid JSON: not UTF-8 ({exc})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise InputError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError("body is not valid JSON here: nested too deeply") from None


async def _json_body(request: Request) -> Any:
    charset = _charset(request)
    if charset not in (None, "utf-8", "utf8"):
        raise UnsupportedMediaType(f"JSON must be UTF-8, the request declares charset={charset!r}")
    body = await request.body()
    if not body.strip():
        raise InputError(EMPTY_BODY)
    return parse_json(body)


def _options_from_form(form: Any) -> PredictOptions:
    repeated = sorted(key for key in _OPTION_FIELDS if len(form.getlist(key)) > 1)
    if repeated:
        raise InputError(f"form fields {repeated} given more than once; send each option once")
    # an empty field is refused like any other bad value, not read as "use the default"
    fields = {key: form.get(key) for key in _OPTION_FIELDS if form.get(key) is not None}
    texts = [key for key, value in fields.items() if not isinstance(value, str)]
    if texts:
        raise InputError(f"form fields {texts} must be text values, got file uploads")
    unknown = sorted(set(form.keys()) - set(_OPTION_FIELDS) - {"file", "files"})
    if unknown:
        raise InputError(
            f"unknown form fields {unknown}; files go in 'file' (or 'files'), options: {list(_OPTION_FIELDS)}"
        )
    return _validate(PredictOptions, fields)  # type: ignore[no-any-return]


def _images_to_tensor(images: list[np.ndarray], loaded: LoadedService) -> torch.Tensor:
    return loaded.bundle.normalisation.apply(np.stack(images))


def _decode_files(blobs: list[bytes], loaded: LoadedService, names: list[str]) -> torch.Tensor:
    images = []
    for blob, name in zip(blobs, names, strict=True):
        try:
            images.append(decode_image(blob, loaded.contract))
        except InputError as exc:
            raise InputError(f"{name}: {exc}" if name.endswith("]") else str(exc)) from None
    return _images_to_tensor(images, loaded)


def _decode_base64s(
    texts: list[str], loaded: LoadedService, names: list[str]
) -> tuple[torch.Tensor, list[bytes]]:
    """The images and their decoded bytes (what the fallback item carries as the image received)."""
    images, blobs = [], []
    for text, name in zip(texts, names, strict=True):
        try:
            blobs.append(decode_base64(text))
            images.append(decode_image(blobs[-1], loaded.contract))
        except InputError as exc:
            raise InputError(f"{name}: {exc}" if name.endswith("]") else str(exc)) from None
    return _images_to_tensor(images, loaded), blobs


MAX_TENSOR_ABS = 1e6
"""Largest magnitude of a tensor value. Normalised images lie within a few units of 0; values near the
float32 limit overflow inside the network (NaN scores, refused by the detectors) instead of meaning
anything, so they are refused here with a message that says why."""


def _tensors(values: list[Any], loaded: LoadedService, names: list[str]) -> torch.Tensor:
    parts = []
    for value, name in zip(values, names, strict=True):
        try:
            tensor = tensor_from_json(value, loaded.bundle.input_shape)
            largest = float(tensor.abs().max())
            if largest > MAX_TENSOR_ABS:
                raise InputError(
                    f"tensor holds a value of magnitude {largest:.3g}, "
                    f"beyond the limit of {MAX_TENSOR_ABS:g} "
                    "(values are normalised with the bundle's mean and std, "
                    "so they lie within a few units of 0)"
                )
            parts.append(tensor)
        except InputError as exc:
            raise InputError(f"{name}: {exc}" if name.endswith("]") else str(exc)) from None
    return torch.cat(parts)


async def _read_uploads(uploads: list[Any], field: str) -> list[bytes]:
    blobs = []
    for upload in uploads:
        if not isinstance(upload, UploadFile):
            raise InputError(f"form field '{field}' must be a file upload, got a text value")
        blobs.append(await upload.read())
    return blobs


class _MultiPartParser(MultiPartParser):
    """Starlette's parser, except that a part declaring a non-text ``Content-Type`` (``image/png``) is
    read as a file even without a ``filename``: RFC 7578 makes the filename optional ("SHOULD"), and
    such a part would otherwise be decoded as text and its bytes lost."""

    def on_headers_finished(self) -> None:
        part = self._current_part
        if part.content_disposition is not None:
            _, options = parse_options_header(part.content_disposition)
            content_type = dict(part.item_headers).get(b"content-type", b"").split(b";")[0].strip().lower()
            if b"filename" not in options and content_type and not content_type.startswith(b"text/"):
                part.content_disposition += b'; filename=""'
        super().on_headers_finished()


async def _read_form(request: Request, max_files: int) -> FormData:
    """Parse a multipart body; past ``max_files`` files it is :class:`TooManyImages` (413)."""
    try:
        async with aclosing(request.stream()) as stream:
            parser = _MultiPartParser(
                request.headers, stream, max_files=max_files + 1, max_fields=len(_OPTION_FIELDS) + 4
            )
            return await parser.parse()
    except MultiPartException as exc:
        if "too many files" in exc.message.lower():
            raise TooManyImages(f"more than {max_files} file(s) in one request, the limit") from None
        raise InputError(f"unreadable multipart body: {exc.message}") from None


async def parse_single(request: Request, loaded: LoadedService) -> ParsedRequest:
    """One image from ``POST /predict``."""
    media = _media_type(request)
    if media == "application/json":
        payload = _validate(PredictJSON, await _json_body(request))
        options = PredictOptions(**{k: getattr(payload, k) for k in _OPTION_FIELDS})
        if payload.image is not None:
            x, blobs = await run_in_threadpool(_decode_base64s, [payload.image], loaded, ["image"])
            return ParsedRequest(x, options, blobs)
        x = await run_in_threadpool(_tensors, [payload.tensor], loaded, ["tensor"])
        return ParsedRequest(x, options)
    if media == "multipart/form-data":
        form = await _read_form(request, 1)
        try:
            uploads = form.getlist("file")
            if len(uploads) != 1:
                raise InputError(
                    "multipart body needs exactly one file field 'file'"
                    + (f", got {len(uploads)}" if uploads else "")
                    + " (use /predict/batch with 'files' for several)"
                )
            blobs = await _read_uploads(uploads, "file")
            options = _options_from_form(form)
        finally:
            await form.close()
        x = await run_in_threadpool(_decode_files, blobs, loaded, ["file"])
        return ParsedRequest(x, options, blobs)
    if media in ("image/png", "image/jpeg"):
        body = await request.body()
        if not body:
            raise InputError(EMPTY_BODY)
        x = await run_in_threadpool(_decode_files, [body], loaded, ["body"])
        return ParsedRequest(x, PredictOptions(), [body])
    if media == "":
        if not await request.body():
            raise InputError(EMPTY_BODY)
        raise UnsupportedMediaType(
            "missing Content-Type: use application/json, multipart/form-data or image/png|jpeg"
        )
    raise UnsupportedMediaType(
        f"content type {media!r} is not accepted: use application/json, multipart/form-data or image/png|jpeg"
    )


async def parse_batch(request: Request, loaded: LoadedService, limit: int) -> ParsedRequest:
    """Up to ``limit`` images from ``POST /predict/batch``; more is :class:`TooManyImages` (413)."""

    def check_count(n: int) -> None:
        if n > limit:
            raise TooManyImages(f"{n} images in one request, more than the limit of {limit}; split the batch")
        if n == 0:
            raise InputError("no images: the batch is empty")

    media = _media_type(request)
    if media == "application/json":
        payload = _validate(BatchJSON, await _json_body(request))
        options = PredictOptions(**{k: getattr(payload, k) for k in _OPTION_FIELDS})
        if payload.images is not None:
            check_count(len(payload.images))
            names = [f"images[{i}]" for i in range(len(payload.images))]
            x, blobs = await run_in_threadpool(_decode_base64s, payload.images, loaded, names)
            return ParsedRequest(x, options, blobs)
        assert payload.tensors is not None
        check_count(len(payload.tensors))
        names = [f"tensors[{i}]" for i in range(len(payload.tensors))]
        x = await run_in_threadpool(_tensors, payload.tensors, loaded, names)
        return ParsedRequest(x, options)
    if media == "multipart/form-data":
        form = await _read_form(request, limit)
        try:
            uploads = form.getlist("files") + form.getlist("file")
            check_count(len(uploads))
            blobs = await _read_uploads(uploads, "files")
            options = _options_from_form(form)
        finally:
            await form.close()
        names = [f"files[{i}]" for i in range(len(blobs))]
        x = await run_in_threadpool(_decode_files, blobs, loaded, names)
        return ParsedRequest(x, options, blobs)
    if media == "" and not await request.body():
        raise InputError(
            'empty body: send JSON {"images": [...]} or {"tensors": [...]}, or multipart \'files\''
        )
    raise UnsupportedMediaType(
        f"content type {media or '(none)'!r} is not accepted here: "
        "use application/json or multipart/form-data"
    )

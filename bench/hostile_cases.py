"""The catalogue of hostile requests: every kind of malformed, oversized, odd or abusive input the
predict routes must answer with a JSON 4xx naming the problem (or, for odd but valid images, a 200),
never a 5xx.

Each :class:`Case` is a plain HTTP request (method, path, headers, body bytes) plus what a correct
server answers: the allowed statuses, the error ``type`` and a fragment of the message. Cases marked
``raw`` are written as bytes on a socket (malformed HTTP itself: oversized headers, a lying
Content-Length); they need a real server and are answered by the HTTP parser, before the app.

The catalogue is built from what the server says about itself (:class:`Target`: input shape, batch
limit, payload cap, pixel cap), so one list serves the in-process tests and ``python -m bench.hostile``
against any running server.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Target:
    """What the catalogue needs to know of the server under test."""

    channels: int = 1
    size: int = 28
    max_images_per_request: int = 64
    max_payload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    signal_sets: tuple[str, ...] = ("msp",)


@dataclass(frozen=True)
class Case:
    """One hostile request and what a correct answer looks like.

    ``expect``: allowed statuses; ``error_type``/``fragment``: the JSON error's ``type`` and a piece of
    its message (case-insensitive), checked when the answer is a 4xx; ``raw``: bytes sent on a socket
    instead (then ``json_body`` says whether the answer must still be JSON: the HTTP parser answers
    malformed HTTP before the app sees it).
    """

    name: str
    group: str
    method: str = "POST"
    path: str = "/predict"
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""
    expect: tuple[int, ...] = (422,)
    error_type: str | None = None
    fragment: str | None = None
    raw: bytes | None = None
    json_body: bool = True


# ------------------------------------------------------------------ image and body builders
def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(size: int, mode: str = "L", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}[mode]
    shape = (size, size) if bands == 1 else (size, size, bands)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A hand-written 8-bit greyscale PNG: IHDR with any size, optional chunks, the IDAT given."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@lru_cache(maxsize=2)
def png_bomb(side: int) -> bytes:
    """A real decompression bomb: ``side x side`` zero pixels, a few hundred KB compressed."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    parts = [compressor.compress(row) for _ in range(side)]
    return png_header(side, side, b"".join(parts) + compressor.flush())


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its SOF frame header claiming ``width x height``."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]
    raise ValueError("no SOF marker")


def exif_rotated_jpeg(size: int) -> bytes:
    image = noise(size, "RGB", 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW
    return encode(image, "JPEG", exif=exif.tobytes())


def apng(size: int) -> bytes:
    frames = [noise(size, "L", s) for s in range(3)]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)


def gif_animated(size: int) -> bytes:
    frames = [noise(size, "L", s).convert("P") for s in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def tiff_multiframe(size: int) -> bytes:
    frames = [noise(size, "L", s) for s in range(2)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def multipart(
    parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = "hostileXb0und"
) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body by hand (duplicates, text-as-file and missing fields allowed)."""
    out = io.BytesIO()
    for name, filename, ctype, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disposition}\r\n".encode())
        if ctype:
            out.write(f"Content-Type: {ctype}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def tensor_text(target: Target, cell: str = "0.0", first: str | None = None) -> str:
    """``C x H x W`` tensor as JSON text, every cell ``cell`` except the first (``first``)."""
    row = "[" + ", ".join([cell] * target.size) + "]"
    plane = "[" + ", ".join([row] * target.size) + "]"
    text = "[" + ", ".join([plane] * target.channels) + "]"
    if first is not None:
        text = text.replace(cell, first, 1)
    return text


# ------------------------------------------------------------------ the catalogue
def build_cases(target: Target) -> list[Case]:
    """Every hostile case for ``target``; at least 60 kinds."""
    n, mode = target.size, ("L" if target.channels == 1 else "RGB")
    good = encode(noise(n, mode))
    good_jpeg = encode(noise(n, "RGB", 1), "JPEG", quality=90)
    big_jpeg = encode(noise(64, "RGB", 2), "JPEG", quality=90)
    b64 = base64.b64encode(good).decode()
    cases: list[Case] = []

    def upload(
        name: str,
        data: bytes,
        expect: tuple[int, ...] = (422,),
        error_type: str | None = "invalid_input",
        fragment: str | None = None,
        ctype: str = "image/png",
        group: str = "image",
    ) -> None:
        body, headers = multipart([("file", "x.img", ctype, data)])
        cases.append(
            Case(
                name,
                group,
                headers=headers,
                content=body,
                expect=expect,
                error_type=error_type,
                fragment=fragment,
            )
        )

    def as_json(
        name: str,
        text: str | bytes,
        expect: tuple[int, ...] = (422,),
        error_type: str | None = "invalid_input",
        fragment: str | None = None,
        path: str = "/predict",
        group: str = "json",
        headers: dict[str, str] | None = None,
    ) -> None:
        content = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        cases.append(
            Case(
                name,
                group,
                path=path,
                headers=headers or JSON,
                content=content,
                expect=expect,
                error_type=error_type,
                fragment=fragment,
            )
        )

    ok: tuple[int, ...] = (200,)
    # --- corrupt and truncated files of every common format
    upload("png-truncated-half", good[: len(good) // 2], fragment="truncated or corrupt")
    upload("png-truncated-header", good[:20], fragment="truncated or corrupt")
    upload("png-signature-only", good[:8], fragment="not a PNG or JPEG")
    flipped = bytearray(good)
    for i in range(60, len(flipped) - 20, 7):
        flipped[i] ^= 0x5A
    upload("png-corrupt-idat", bytes(flipped), fragment="corrupt")
    upload("png-bad-crc", good[:29] + b"\x00\x00\x00\x00" + good[33:], fragment="not a PNG or JPEG")
    upload("jpeg-truncated", good_jpeg[: len(good_jpeg) // 2], fragment="truncated or corrupt")
    upload("jpeg-soi-only", b"\xff\xd8\xff", fragment="")
    upload("jpeg-no-scan", good_jpeg[:200] + b"\xff\xd9", fragment="")
    upload("gif", encode(noise(n, "L").convert("P"), "GIF"), fragment="not a PNG or JPEG")
    upload("gif-truncated", encode(noise(n, "L").convert("P"), "GIF")[:30], fragment="not a PNG or JPEG")
    upload("gif-animated", gif_animated(n), fragment="not a PNG or JPEG")
    upload("webp", encode(noise(n, "RGB"), "WEBP"), fragment="not a PNG or JPEG")
    upload("webp-corrupt", encode(noise(n, "RGB"), "WEBP")[:40] + b"\x00" * 40, fragment="not a PNG or JPEG")
    upload("tiff", encode(noise(n, "L"), "TIFF"), fragment="not a PNG or JPEG")
    upload("tiff-multiframe", tiff_multiframe(n), fragment="not a PNG or JPEG")
    upload("bmp", encode(noise(n, "L"), "BMP"), fragment="not a PNG or JPEG")
    upload("bmp-truncated", encode(noise(n, "L"), "BMP")[:30], fragment="not a PNG or JPEG")
    upload("empty-file", b"", fragment="empty")
    upload("random-bytes", np.random.default_rng(5).bytes(4096), fragment="not a PNG or JPEG")
    # --- polyglots: what decodes as PNG/JPEG is read as one, the rest refused
    zip_tail = b"PK\x03\x04" + b"\x00" * 26 + b"PK\x05\x06" + b"\x00" * 18
    upload("polyglot-png-zip", good + zip_tail, expect=ok)
    upload(
        "polyglot-jpeg-script-comment",
        good_jpeg[:2] + b"\xff\xfe\x00\x16<script>x()</script>" + good_jpeg[2:],
        expect=ok,
    )
    upload("polyglot-gif-js", b"GIF89a/*\x01\x00\x01\x00*/=alert(1);", fragment="not a PNG or JPEG")
    upload(
        "polyglot-png-signature-html",
        good[:8] + b"<html><body>hi</body></html>",
        fragment="not a PNG or JPEG",
    )
    upload(
        "svg-xml",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        fragment="not a PNG or JPEG",
    )
    # --- bombs and extreme sizes (pixel cap from the header, before decoding)
    upload("bomb-png-20000x20000", png_bomb(20000), fragment="limit")
    upload("bomb-png-header-65535", png_header(65535, 65535, zlib.compress(b"\x00" * 100)), fragment="limit")
    upload("bomb-jpeg-header-65500", jpeg_with_size(big_jpeg, 65500, 65500), fragment="limit")
    upload(
        "png-aspect-strip-1x1000000",
        png_header(1_000_000, 1, zlib.compress(b"\x00" * 1_000_001)),
        fragment="aspect ratio",
    )
    upload("png-zero-size", png_header(0, 0, zlib.compress(b"")), fragment="")
    ztxt = _chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))
    upload(
        "png-text-chunk-bomb",
        png_header(n, n, zlib.compress(b"\x00" * (n + 1) * n), ztxt),
        expect=(200, 422),
        fragment="",
    )
    upload("png-1x1", encode(Image.new("L", (1, 1), 128)), expect=ok)
    upload("png-wide-3000x2", encode(Image.new("L", (3000, 2), 9)), expect=ok)
    upload("png-large-2000x2000", encode(Image.new("L", (2000, 2000), 9)), expect=ok)
    # --- odd but valid modes: converted to the bundle's channels
    sixteen = Image.fromarray(np.random.default_rng(1).integers(0, 65535, (n, n), dtype=np.uint16))
    upload("png-16bit-grey", encode(sixteen), expect=ok)
    upload("png-palette", encode(noise(n, "RGB").convert("P")), expect=ok)
    upload("png-palette-transparency", encode(noise(n, "RGB").convert("P"), transparency=0), expect=ok)
    upload("png-grey-alpha", encode(noise(n, "LA")), expect=ok)
    upload("png-rgba", encode(noise(n, "RGBA")), expect=ok)
    upload("png-1bit", encode(noise(n, "L").convert("1")), expect=ok)
    upload("jpeg-quality-1", encode(noise(n, "RGB"), "JPEG", quality=1), expect=ok)
    upload("png-animated-apng", apng(n), expect=ok)
    upload("png-interlaced", encode(noise(n, mode), interlace=1), expect=ok)
    upload("jpeg-cmyk", encode(noise(n, "CMYK"), "JPEG"), expect=ok)
    upload("jpeg-grey", encode(noise(n, "L"), "JPEG"), expect=ok)
    upload("jpeg-progressive", encode(noise(n, "RGB"), "JPEG", progressive=True), expect=ok)
    upload("jpeg-exif-rotated", exif_rotated_jpeg(n), expect=ok)
    upload(
        "jpeg-huge-app-segment", good_jpeg[:2] + b"\xff\xe1\xff\xfe" + b"E" * 65532 + good_jpeg[2:], expect=ok
    )
    # --- content types and multipart structure
    cases.append(
        Case(
            "ctype-text-plain",
            "content-type",
            headers={"content-type": "text/plain"},
            content=b"hello",
            expect=(415,),
            error_type="unsupported_media_type",
            fragment="not accepted",
        )
    )
    cases.append(
        Case(
            "ctype-xml",
            "content-type",
            headers={"content-type": "application/xml"},
            content=b"<a/>",
            expect=(415,),
            error_type="unsupported_media_type",
            fragment="not accepted",
        )
    )
    cases.append(
        Case(
            "ctype-image-gif-raw",
            "content-type",
            headers={"content-type": "image/gif"},
            content=good,
            expect=(415,),
            error_type="unsupported_media_type",
            fragment="not accepted",
        )
    )
    cases.append(
        Case(
            "ctype-missing",
            "content-type",
            content=good,
            expect=(415,),
            error_type="unsupported_media_type",
            fragment="missing content-type",
        )
    )
    cases.append(
        Case(
            "ctype-png-declared-json-sent",
            "content-type",
            headers={"content-type": "image/png"},
            content=b'{"image": "x"}',
            error_type="invalid_input",
            fragment="not a PNG or JPEG",
        )
    )
    cases.append(
        Case(
            "ctype-png-raw-ok", "content-type", headers={"content-type": "image/png"}, content=good, expect=ok
        )
    )
    cases.append(
        Case(
            "ctype-multipart-no-boundary",
            "multipart",
            headers={"content-type": "multipart/form-data"},
            content=b"--x\r\n\r\n",
            error_type="invalid_input",
            fragment="multipart",
        )
    )
    body, _ = multipart([("file", "x.png", "image/png", good)], boundary="right")
    cases.append(
        Case(
            "multipart-wrong-boundary",
            "multipart",
            headers={"content-type": "multipart/form-data; boundary=wrong"},
            content=body,
            error_type="invalid_input",
            fragment="multipart",
        )
    )
    cases.append(
        Case(
            "multipart-truncated",
            "multipart",
            headers=multipart([("file", "x.png", "image/png", good)])[1],
            content=multipart([("file", "x.png", "image/png", good)])[0][:-40],
            error_type="invalid_input",
            fragment="",
        )
    )
    for name, parts, fragment in [
        ("multipart-missing-file", [("signal_set", None, None, b"msp")], "exactly one file field"),
        (
            "multipart-duplicate-file",
            [("file", "a.png", "image/png", good), ("file", "b.png", "image/png", good)],
            "got 2",
        ),
        ("multipart-file-as-text", [("file", None, None, b"just text")], "must be a file upload"),
        (
            "multipart-unknown-field",
            [("file", "a.png", "image/png", good), ("evil", None, None, b"1")],
            "unknown form fields",
        ),
        (
            "multipart-duplicate-option",
            [("file", "a.png", "image/png", good), ("top_k", None, None, b"2"), ("top_k", None, None, b"3")],
            "more than once",
        ),
        (
            "multipart-option-as-file",
            [("file", "a.png", "image/png", good), ("top_k", "k.txt", "text/plain", b"2")],
            "text values",
        ),
        (
            "multipart-bad-top-k",
            [("file", "a.png", "image/png", good), ("top_k", None, None, b"many")],
            "top_k",
        ),
        (
            "multipart-many-fields",
            [("file", "a.png", "image/png", good)] + [(f"f{i}", None, None, b"1") for i in range(200)],
            "",
        ),
    ]:
        body, headers = multipart(parts)  # type: ignore[arg-type]
        error_type = "validation_error" if name == "multipart-bad-top-k" else "invalid_input"
        cases.append(
            Case(name, "multipart", headers=headers, content=body, error_type=error_type, fragment=fragment)
        )
    # --- empty and huge bodies
    cases.append(Case("empty-body", "body", content=b"", error_type="invalid_input", fragment="empty body"))
    as_json("empty-json-body", "   ", fragment="empty body", group="body")
    huge = b"0" * (target.max_payload_bytes + 1024)
    cases.append(
        Case(
            "huge-body",
            "body",
            headers=JSON,
            content=huge,
            expect=(413,),
            error_type="payload_too_large",
            fragment="more than the limit",
        )
    )
    cases.append(
        Case(
            "huge-multipart",
            "body",
            headers=multipart([("file", "x.png", "image/png", huge)])[1],
            content=multipart([("file", "x.png", "image/png", huge)])[0],
            expect=(413,),
            error_type="payload_too_large",
            fragment="more than the limit",
        )
    )
    # --- JSON structure
    as_json("json-invalid", '{"image": ', fragment="not valid JSON")
    as_json("json-deeply-nested-array", "[" * 100_000 + "]" * 100_000, fragment="nested too deeply")
    as_json("json-deeply-nested-object", '{"a":' * 50_000 + "1" + "}" * 50_000, fragment="nested too deeply")
    as_json("json-bom", "\ufeff" + json.dumps({"image": b64}), expect=ok)
    as_json("json-utf16", json.dumps({"image": b64}).encode("utf-16"), fragment="not UTF-8")
    as_json(
        "json-charset-latin1",
        b'{"image": "\xe9"}',
        expect=(415,),
        error_type="unsupported_media_type",
        fragment="UTF-8",
        headers={"content-type": "application/json; charset=latin-1"},
    )
    as_json("json-invalid-utf8", b'{"image": "\xff\xfe"}', fragment="not UTF-8")
    as_json("json-duplicate-keys", f'{{"image": "{b64}", "image": "AAAA"}}', fragment="twice")
    as_json("json-top-level-array", "[1, 2, 3]", error_type="validation_error", fragment="valid dictionary")
    as_json("json-null", "null", error_type="validation_error", fragment="valid dictionary")
    as_json(
        "json-unknown-field",
        json.dumps({"image": b64, "evil": 1}),
        error_type="validation_error",
        fragment="evil",
    )
    as_json(
        "json-image-and-tensor",
        f'{{"image": "{b64}", "tensor": {tensor_text(target)}}}',
        error_type="validation_error",
        fragment="exactly one",
    )
    as_json("json-neither-input", "{}", error_type="validation_error", fragment="exactly one")
    as_json("json-image-number", '{"image": 5}', error_type="validation_error", fragment="valid string")
    as_json(
        "json-top-k-huge",
        json.dumps({"image": b64, "top_k": 10**6}),
        error_type="validation_error",
        fragment="top_k",
    )
    as_json(
        "json-top-k-zero",
        json.dumps({"image": b64, "top_k": 0}),
        error_type="validation_error",
        fragment="top_k",
    )
    as_json("json-top-k-bigint", '{{"image": "{}", "top_k": {}}}'.format(b64, "9" * 5000), fragment="digits")
    as_json(
        "json-top-k-float",
        json.dumps({"image": b64, "top_k": 2.5}),
        error_type="validation_error",
        fragment="top_k",
    )
    as_json(
        "json-full-evidence-string",
        json.dumps({"image": b64, "full_evidence": "maybe"}),
        error_type="validation_error",
        fragment="full_evidence",
    )
    # --- tensors: values, shapes, dtypes
    as_json(
        "tensor-nan",
        '{{"tensor": {}}}'.format(tensor_text(target, first="NaN")),
        fragment="NaN",
        group="tensor",
    )
    as_json(
        "tensor-infinity",
        '{{"tensor": {}}}'.format(tensor_text(target, first="-Infinity")),
        fragment="infinite",
        group="tensor",
    )
    as_json(
        "tensor-1e400",
        '{{"tensor": {}}}'.format(tensor_text(target, first="1e400")),
        fragment="infinite",
        group="tensor",
    )
    as_json(
        "tensor-float32-overflow",
        '{{"tensor": {}}}'.format(tensor_text(target, first="1e39")),
        fragment="infinite",
        group="tensor",
    )
    as_json(
        "tensor-bigint",
        '{{"tensor": {}}}'.format(tensor_text(target, first="1" + "0" * 400)),
        fragment="digits",
        group="tensor",
    )
    as_json(
        "tensor-strings",
        '{{"tensor": {}}}'.format(tensor_text(target, cell='"1.5"')),
        fragment="str",
        group="tensor",
    )
    as_json(
        "tensor-booleans",
        '{{"tensor": {}}}'.format(tensor_text(target, cell="true")),
        fragment="bool",
        group="tensor",
    )
    as_json(
        "tensor-nulls",
        '{{"tensor": {}}}'.format(tensor_text(target, cell="null")),
        fragment="NoneType",
        group="tensor",
    )
    as_json(
        "tensor-objects",
        '{{"tensor": {}}}'.format(tensor_text(target, cell='{"a": 1}')),
        fragment="dict",
        group="tensor",
    )
    as_json(
        "tensor-wrong-shape",
        f'{{"tensor": [{tensor_text(Target(target.channels, n - 1))}]}}',
        fragment="shape",
        group="tensor",
    )
    as_json("tensor-ragged", '{"tensor": [[[0.0, 0.0], [0.0]]]}', fragment="ragged", group="tensor")
    as_json("tensor-5d", f'{{"tensor": [[{tensor_text(target)}]]}}', fragment="shape", group="tensor")
    as_json(
        "tensor-scalar",
        '{"tensor": 1.0}',
        error_type="validation_error",
        fragment="valid list",
        group="tensor",
    )
    as_json("tensor-empty", '{"tensor": []}', fragment="shape", group="tensor")
    as_json("tensor-deep-list", '{"tensor": %s}' % ("[" * 900 + "]" * 900), fragment="", group="tensor")
    as_json(
        "tensor-huge-wrong-shape",
        '{{"tensor": [{}]}}'.format(", ".join(["0"] * (target.max_payload_bytes // 4))),
        fragment="shape",
        group="tensor",
    )
    # --- base64
    as_json(
        "base64-unicode-garbage",
        json.dumps({"image": "ЖЖЖЖ☃☃" + b64[:20]}),
        fragment="base64",
        group="base64",
    )
    as_json("base64-lone-surrogate", '{"image": "\\ud800\\udfff\\ud800"}', fragment="", group="base64")
    as_json("base64-bad-padding", json.dumps({"image": b64[:-3] + "="}), fragment="base64", group="base64")
    as_json(
        "base64-bad-data-url",
        json.dumps({"image": "data:image/png," + b64}),
        fragment="data URL",
        group="base64",
    )
    as_json(
        "base64-of-text",
        json.dumps({"image": base64.b64encode(b"hello world").decode()}),
        fragment="not a PNG or JPEG",
        group="base64",
    )
    as_json(
        "base64-of-bomb",
        json.dumps({"image": base64.b64encode(png_bomb(20000)).decode()}),
        fragment="limit",
        group="base64",
    )
    as_json("base64-empty", json.dumps({"image": ""}), fragment="empty", group="base64")
    # --- batch limits
    over = target.max_images_per_request + 1
    as_json(
        "batch-over-limit-json",
        json.dumps({"images": [b64] * over}),
        expect=(413,),
        error_type="too_many_images",
        fragment="more than the limit",
        path="/predict/batch",
        group="batch",
    )
    body, headers = multipart([("files", f"{i}.png", "image/png", good) for i in range(over)])
    cases.append(
        Case(
            "batch-over-limit-multipart",
            "batch",
            path="/predict/batch",
            headers=headers,
            content=body,
            expect=(413,),
            error_type="too_many_images",
            fragment="limit",
        )
    )
    as_json("batch-empty", json.dumps({"images": []}), fragment="empty", path="/predict/batch", group="batch")
    as_json(
        "batch-one-bad-image",
        json.dumps({"images": [b64, "AAAA", b64]}),
        fragment="images[1]",
        path="/predict/batch",
        group="batch",
    )
    as_json(
        "batch-images-not-list",
        json.dumps({"images": b64}),
        error_type="validation_error",
        fragment="list",
        path="/predict/batch",
        group="batch",
    )
    cases.append(
        Case(
            "batch-raw-png",
            "batch",
            path="/predict/batch",
            headers={"content-type": "image/png"},
            content=good,
            expect=(415,),
            error_type="unsupported_media_type",
            fragment="not accepted",
        )
    )
    # --- query parameters and options
    body = json.dumps({"image": b64}).encode()
    for name, query, error_type, fragment in [
        ("query-unknown-parameter", "?evil=1", "validation_error", "unknown query parameter"),
        ("query-typo-parameter", "?signal-set=msp", "validation_error", "unknown query parameter"),
        ("query-unknown-signal-set", "?signal_set=nope", "invalid_option", "unknown signal set"),
        (
            "query-unknown-operating-point",
            "?operating_point=nope",
            "invalid_option",
            "unknown operating point",
        ),
        ("query-top-k-zero", "?top_k=0", "validation_error", "top_k"),
        ("query-bool-garbage", "?full_evidence=maybe", "validation_error", "full_evidence"),
        ("query-unicode-signal-set", "?signal_set=%F0%9F%92%A5%00", "invalid_option", "unknown signal set"),
    ]:
        cases.append(
            Case(
                name,
                "query",
                path="/predict" + query,
                headers=JSON,
                content=body,
                error_type=error_type,
                fragment=fragment,
            )
        )
    as_json(
        "body-unknown-signal-set",
        json.dumps({"image": b64, "signal_set": "../../etc/passwd"}),
        error_type="invalid_option",
        fragment="unknown signal set",
        group="query",
    )
    # --- headers, methods, paths
    cases.append(
        Case(
            "header-bad-timeout",
            "headers",
            headers={**JSON, "x-request-timeout": "soon"},
            content=body,
            expect=(400,),
            error_type="invalid_header",
            fragment="X-Request-Timeout",
        )
    )
    cases.append(
        Case(
            "header-negative-timeout",
            "headers",
            headers={**JSON, "x-request-timeout": "-1"},
            content=body,
            expect=(400,),
            error_type="invalid_header",
            fragment="positive",
        )
    )
    cases.append(
        Case(
            "header-hostile-request-id",
            "headers",
            headers={**JSON, "x-request-id": "a" * 500 + "<script>"},
            content=body,
            expect=ok,
        )
    )
    cases.append(
        Case(
            "header-many-small",
            "headers",
            headers={**JSON, **{f"x-h{i}": "v" for i in range(150)}},
            content=body,
            expect=(431,),
            error_type="request_too_large",
            fragment="headers",
        )
    )
    cases.append(
        Case(
            "header-one-huge",
            "headers",
            headers={**JSON, "x-big": "b" * 20_000},
            content=body,
            expect=(431,),
            error_type="request_too_large",
            fragment="headers",
        )
    )
    cases.append(
        Case(
            "header-bad-content-length",
            "http",
            raw=(head_for("/predict") + "Content-Length: abc\r\n\r\n").encode(),
            expect=(400,),
            json_body=False,
        )
    )
    cases.append(
        Case(
            "method-get-predict",
            "method",
            method="GET",
            expect=(405,),
            error_type="http_error",
            fragment="not allowed",
        )
    )
    cases.append(
        Case(
            "method-put-predict",
            "method",
            method="PUT",
            headers=JSON,
            content=body,
            expect=(405,),
            error_type="http_error",
            fragment="not allowed",
        )
    )
    cases.append(
        Case(
            "path-unknown",
            "method",
            path="/predict/../../etc/passwd",
            method="GET",
            expect=(404,),
            error_type="http_error",
            fragment="not found",
        )
    )
    cases.append(
        Case(
            "path-long",
            "method",
            path="/" + "a" * 4000,
            method="GET",
            expect=(404,),
            error_type="http_error",
            fragment="not found",
        )
    )
    # --- malformed HTTP, on a raw socket (answered by the HTTP parser or the header guard; behind a
    # proxy, by the proxy: so any of these statuses, JSON not required)
    head = head_for("/predict")
    cases.append(
        Case(
            "http-header-too-large",
            "http",
            raw=(head + "X-Big: " + "b" * 70_000 + "\r\n\r\n").encode(),
            expect=(400, 413, 414, 431, 494),
            json_body=False,
        )
    )
    cases.append(
        Case(
            "http-too-many-headers",
            "http",
            raw=(head + "".join(f"X-H{i}: v\r\n" for i in range(5000)) + "\r\n").encode(),
            expect=(400, 413, 431, 494),
            json_body=False,
        )
    )
    cases.append(
        Case(
            "http-url-too-long",
            "http",
            raw=("GET /healthz?" + "q" * 70_000 + " HTTP/1.1\r\nHost: t\r\n\r\n").encode(),
            expect=(400, 413, 414, 431, 494),
            json_body=False,
        )
    )
    cases.append(
        Case(
            "http-garbage-request-line",
            "http",
            raw=b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n",
            expect=(400,),
            json_body=False,
        )
    )
    cases.append(
        Case(
            "http-content-length-and-chunked",
            "http",
            raw=(head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode(),
            expect=(400, 413, 422),
            json_body=False,
        )
    )
    return cases


def head_for(path: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


def check_answer(case: Case, status: int, body: bytes) -> str | None:
    """None when the answer is what ``case`` expects, else what is wrong (for the report)."""
    if status >= 500:
        return f"server error {status}"
    if status not in case.expect:
        return f"status {status}, expected {list(case.expect)}"
    if case.raw is not None and not case.json_body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return f"answer is not JSON: {body[:80]!r}"
    if status == 200:
        ok = isinstance(data, dict) and "label" in data or isinstance(data, list)
        return None if ok else f"200 without a prediction: {str(data)[:80]}"
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        return f"4xx without an error message: {str(data)[:80]}"
    if case.error_type is not None and error.get("type") != case.error_type:
        return f"error type {error.get('type')!r}, expected {case.error_type!r}"
    if case.fragment and case.fragment.lower() not in str(error["message"]).lower():
        return f"message {error['message'][:100]!r} does not name {case.fragment!r}"
    return None


CaseFilter = Callable[[Case], bool]

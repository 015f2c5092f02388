"""Reading requests: a JSON or form body into its pydantic model (400 for a body that is not JSON,
422 naming the field), and an OpenAI-style video request (`seconds`, `size`) onto the
`GenerationSpec` the job service validates."""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from serve.config import ModelConfig
from serve.contracts import SIZE_MULTIPLE, VAE_TEMPORAL_FACTOR, GenerationSpec
from serve.errors import CineVividError, InvalidForm, InvalidJSON, InvalidSpecError, PayloadTooLarge

# A request body nests objects and lists at most this deep (the deepest real one, a voice-over
# inside a video request, is 2); deeper is a 400, whatever the parser could take.
MAX_JSON_DEPTH = 16
# Form fields that carry an object: a JSON-encoded string (or name[key] fields), parsed here with the
# same checks as a JSON body (depth, lone surrogates), so every kind of body meets one parser.
FORM_OBJECT_FIELDS = ("voiceover", "lora")
# What a form may hold (Starlette's defaults): more is a 400
MAX_FORM_FIELDS = 1000
MAX_FORM_FILES = 16
MAX_FORM_PART_BYTES = 1024 * 1024


def _bad_json(message: str) -> CineVividError:
    return InvalidJSON(message)


def check_structure(data: Any) -> None:
    """400 for a body nested deeper than MAX_JSON_DEPTH, and for a string (or key) that is not
    valid Unicode text (a lone surrogate such as "\\ud800", which JSON allows but no text field
    can store), naming the field."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                top = where.split(".")[0] or None
                raise InvalidJSON(f"{top or 'the request body'} nests deeper than {MAX_JSON_DEPTH} levels",
                                  param=top)
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if isinstance(key, str):
                    _check_text(key, where or "body")
                stack.append((value, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(node, str):
            _check_text(node, where or "body")


def _parse_json(raw: str | bytes, where: str | None) -> Any:
    """JSON text (a body, or a form field's value) with the body's rules: 400 naming `where`."""
    what = f"{where}" if where else "the request body"
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidJSON(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", param=where) from None
    except ValueError as exc:
        if "int_max_str_digits" in str(exc):  # Python's own limit, named in its message: not ours to show
            raise InvalidJSON(f"{what} holds a number with too many digits", param=where) from None
        raise InvalidJSON(f"{what} is not valid JSON: {exc}", param=where) from None


def _decode_form_objects(data: dict) -> dict:
    """The object fields of a form (FORM_OBJECT_FIELDS) sent as JSON strings, parsed."""
    for name in FORM_OBJECT_FIELDS:
        value = data.get(name)
        if isinstance(value, str):
            parsed = _parse_json(value, name)
            if not isinstance(parsed, dict):
                raise InvalidSpecError(f"{name} must be a JSON object", param=name)
            data[name] = parsed
    return data


def _check_text(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSpecError(f"{where} is not valid Unicode text (it contains a lone surrogate)",
                               param=where) from None


async def read_body(request: Request, model: type[BaseModel], *, allow_empty: bool = False,
                    form_ok: bool = True) -> BaseModel:
    """Parse a JSON or form body into `model`: 400 for unparseable JSON, 422 naming the field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data: Any
    if form_ok and ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await _read_form(request)
        try:
            data = _decode_form_objects(unflatten_form(form.multi_items()))
        finally:
            await form.close()
    else:
        raw = await request.body()
        if not raw.strip():
            if not allow_empty:
                raise InvalidJSON("the request body is empty; send a JSON object")
            data = {}
        else:
            data = _parse_json(raw, None)
    if not isinstance(data, dict):
        raise _bad_json("the request body must be a JSON object")
    check_structure(data)
    return model.model_validate(data)


def _utf8(raw: bytes | bytearray, where: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSpecError(f"{where or 'a form field name'} is not valid UTF-8 text ({exc.reason} at byte "
                               f"{exc.start})", param=where or None) from None


class _StrictFormParser(FormParser):
    """Starlette's urlencoded parser, with UTF-8 text only (Starlette falls back to Latin-1)."""

    def on_field_end(self) -> None:
        self._current_fields += 1
        if self._current_fields > self.max_fields:
            raise MultiPartException(f"too many fields; the limit is {self.max_fields}")
        name = _utf8(unquote_to_bytes(bytes(self._field_name).replace(b"+", b" ")), "")
        value = _utf8(unquote_to_bytes(bytes(self._field_value).replace(b"+", b" ")), name)
        self._items.append((name, value))


class _StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, with UTF-8 text fields only (Starlette falls back to Latin-1)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            self.items.append((part.field_name, _utf8(part.data, part.field_name)))
        else:
            super().on_part_end()


async def _read_form(request: Request):
    """The request's form (413 for too many bytes; 400 for a malformed body or text that is not
    UTF-8, naming the field); close it when done."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == "multipart/form-data":
            parser = _StrictMultiPartParser(request.headers, request.stream(), max_files=MAX_FORM_FILES,
                                            max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_PART_BYTES)
        else:
            parser = _StrictFormParser(request.headers, request.stream(), max_fields=MAX_FORM_FIELDS,
                                       max_part_size=MAX_FORM_PART_BYTES)
        return await parser.parse()
    except CineVividError:
        raise
    except MultiPartException as exc:
        raise InvalidForm(f"malformed form body: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - malformed multipart
        raise InvalidForm(f"malformed form body: {exc}") from None


async def read_body_with_files(request: Request, model: type[BaseModel], file_fields: tuple[str, ...],
                               max_file_bytes: int) -> tuple[BaseModel, dict[str, bytes]]:
    """`read_body` for a request that may upload files (multipart): the model, and the bytes of
    each uploaded file among `file_fields` (at most `max_file_bytes` each: 413 naming the field).
    The form's spooled temporary files are closed (and so removed) before this returns. An upload
    in any other field is a 400 naming it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        return await read_body(request, model), {}
    form = await _read_form(request)
    files: dict[str, bytes] = {}
    try:
        fields = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.append((key, value))
                continue
            if key not in file_fields:
                raise InvalidSpecError(f"{key} cannot be a file upload", param=key)
            if key in files:
                raise InvalidSpecError(f"{key} was uploaded more than once", param=key)
            data = await value.read(max_file_bytes + 1)
            if len(data) > max_file_bytes:
                raise PayloadTooLarge(f"{key} is larger than the limit of {max_file_bytes} bytes", param=key)
            files[key] = data
            fields.append((key, "(uploaded file)"))  # the field is there; its bytes are in `files`
    finally:
        await form.close()
    data = _decode_form_objects(unflatten_form(fields))
    check_structure(data)
    return model.model_validate(data), files


def unflatten_form(items) -> dict:
    """Form fields ((key, value) pairs) to a dict; `a[b]=v` (how the openai SDK sends nested objects) becomes {"a": {"b": v}};
    an uploaded file becomes a marker so the request can reject it by name."""
    out: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(value, str):
            value = {"filename": getattr(value, "filename", None), "upload": True}
        if "[" in key and key.endswith("]"):
            head, _, rest = key.partition("[")
            sub = rest[:-1]
            node = out.setdefault(head, {})
            if isinstance(node, dict):
                node[sub] = value
            continue
        out[key] = value
    return out


def spec_from_openai(req, m: ModelConfig, default_fps: int | None = None) -> GenerationSpec:
    """Map an OpenAI-style request (`seconds`, `size`) onto a GenerationSpec, checking `size` and
    `seconds` against the model's bounds so the error names the field the caller sent."""
    width = height = None
    if getattr(req, "size", None) is not None:  # (an extension has its source's size)
        try:
            w, h = str(req.size).lower().split("x")
            width, height = int(w), int(h)
        except ValueError:
            raise InvalidSpecError(f"size must be WIDTHxHEIGHT, e.g. {m.width}x{m.height}; got {req.size!r}",
                                   param="size") from None
        for name, value, upper in (("width", width, m.max_width), ("height", height, m.max_height)):
            if not m.min_size <= value <= upper or value % SIZE_MULTIPLE:
                raise InvalidSpecError(
                    f"size {req.size} is outside this model's bounds: {name} must be a multiple of "
                    f"{SIZE_MULTIPLE} between {m.min_size} and {upper}", param="size")
    frames = req.num_frames
    if req.seconds is not None and frames is None:
        try:
            seconds = float(req.seconds)
        except ValueError:
            raise InvalidSpecError(f"seconds must be a number, got {req.seconds!r}", param="seconds") from None
        fps = req.fps or default_fps or m.fps
        if not seconds > 0:
            raise InvalidSpecError("seconds must be positive", param="seconds")
        if not 1 <= fps <= m.max_fps:
            raise InvalidSpecError(f"fps must be between 1 and {m.max_fps}, got {fps}", param="fps")
        if not math.isfinite(seconds) or seconds * fps > m.max_frames:
            raise InvalidSpecError(
                f"seconds={req.seconds} is more than this model allows: at most {m.max_frames} frames "
                f"({(m.max_frames - 1) / fps:g} s at {fps} fps)", param="seconds")
        frames = VAE_TEMPORAL_FACTOR * max(0, round(seconds * fps / VAE_TEMPORAL_FACTOR)) + 1
        if frames > m.max_frames:
            raise InvalidSpecError(
                f"seconds={req.seconds} needs {frames} frames at {fps} fps; this model allows at most "
                f"{m.max_frames} frames ({(m.max_frames - 1) / fps:g} s)", param="seconds")
    # every other field of the request that a GenerationSpec has (prompt, steps, guidance, seed, the
    # DF knobs, ...) goes over as is: a new generation field needs no line here
    fields = req.model_dump(include=set(GenerationSpec.model_fields), exclude={"width", "height", "num_frames"})
    return GenerationSpec(**fields, width=width, height=height, num_frames=frames)

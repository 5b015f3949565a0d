"""The ``POST /generate`` body in its two forms: JSON (an init clip as base64 in ``init_audio``) and a form
(``multipart/form-data``: the same fields as form fields, the clip as a file; a form without a file may also be
url-encoded), both validated by the one pydantic model, ``GenerateRequest``; and their OpenAPI description."""
from __future__ import annotations

import base64
import binascii
import json
from typing import TypeVar

import pydantic
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile

from service.schemas import GenerateRequest

M = TypeVar("M", bound=pydantic.BaseModel)


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def invalid(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind}])


async def read_generate_request(request: Request, max_upload_bytes: int,
                                schema: type[GenerateRequest] = GenerateRequest) -> tuple[GenerateRequest, bytes | None]:
    """The request (``schema``: ``GenerateRequest`` or an extension of it) and its init clip's bytes (None without
    one); ``RequestValidationError`` (422) otherwise."""
    if request.headers.get("content-type", "").lower().startswith(FORM_TYPES):
        return await _read_form(request, max_upload_bytes, schema)
    body = validate_json(await request.body(), schema)
    clip = None
    if body.init_audio is not None:
        try:
            clip = base64.b64decode(body.init_audio, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("init_audio", "not valid base64 (a WAV, FLAC, Ogg or MP3 file, base64-encoded)") from None
    return body, clip


def validate_json(raw: bytes, schema: type[M]) -> M:
    """A JSON body as ``schema``, with strict types (a JSON number is no bool and a JSON string no number; a form's
    fields are strings, below); ``RequestValidationError`` (422) naming the field at fault, or ``body`` and the
    problem (not UTF-8, not JSON, nested too deep, a number out of range) with where it is."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestValidationError([{"loc": ("body",), "msg": f"not UTF-8 text, as JSON must be ({exc.reason} at "
                                       f"byte {exc.start})", "type": "value_error"}]) from None
    try:
        return schema.model_validate_json(raw, strict=True)
    except pydantic.ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _read_form(request: Request, max_upload_bytes: int,
                     schema: type[GenerateRequest]) -> tuple[GenerateRequest, bytes | None]:
    try:
        form = await request.form(max_files=1, max_fields=32, max_part_size=max_upload_bytes)
    except Exception as exc:  # noqa: BLE001 - starlette raises its own parse errors (and HTTPException subclasses)
        why = getattr(exc, "detail", None) or exc  # an HTTPException's str() starts with its status
        raise RequestValidationError([{"loc": ("body",), "msg": f"not a valid form ({why})",
                                       "type": "value_error"}]) from None
    fields, clip = {}, None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "init_audio":
                raise invalid(key, "only init_audio may be a file")
            clip = await value.read()
        elif key in fields:
            raise invalid(key, "given more than once")
        else:
            fields[key] = value
    if "init_audio" in fields:  # a form may also carry it as base64 text
        raise invalid("init_audio", "send the clip as a file in a multipart form")
    return _validate(fields, schema), clip


def _validate(data, schema: type[GenerateRequest]) -> GenerateRequest:
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def request_body_openapi(model: type[GenerateRequest] = GenerateRequest) -> dict:
    """The two request forms for the OpenAPI schema. A form's field is there or not, never null: its schema is the
    JSON one without the null alternatives."""
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    form["properties"] = {name: _form_field(prop) for name, prop in form["properties"].items()}
    form["properties"]["init_audio"] = {"type": "string", "format": "binary",
                                        "description": "a WAV / FLAC / Ogg / MP3 clip to start from (a file)"}
    return {"required": True, "content": {"application/json": {"schema": schema},
                                          "multipart/form-data": {"schema": form}}}


def _form_field(prop: dict) -> dict:
    """A field's JSON schema (``X | None``: ``anyOf`` X and null, default null) as a form field's: X."""
    options = [option for option in prop.get("anyOf", ()) if option != {"type": "null"}]
    if "anyOf" not in prop or len(options) != 1:
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**options[0], **rest}

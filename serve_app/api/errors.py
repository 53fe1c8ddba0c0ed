"""Errors are part of the API: one JSON shape, a status that means something, a request id.

    {"error": {"code": "invalid_request", "message": "width: must be ...", "field": "width"},
     "request_id": "3f2a..."}

OpenAI-compatible routes (/v1/...) answer in OpenAI's shape instead:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "size", "code": "invalid_request"}}

422 validation (the field named), 400 malformed body, 413 body too large,
503 overloaded (with Retry-After), 504 timed out, 500 unexpected (never a
stack trace). Every response carries X-Request-Id.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Union, get_args, get_origin

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipeline.params import ImageParams
from ..service.errors import ApiError

OPENAI_PREFIX = "/v1/"


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def validate_or_422(model, data):
    """Validate a body the route parsed itself (multipart forms, dual content types) like FastAPI would."""
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_request", "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = RequestValidationError(exc.errors())
        error.model = model  # its fields' whole rules, for the messages (`validation_problems`)
        raise error from None


def error_body(
    path: str, status: int, code: str, message: str, request_id: str, field: str | None = None, **extra
) -> dict:
    """The error document for a response on `path`: OpenAI's shape under /v1/, ours elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        return {"error": {"message": message, "type": _openai_type(status), "param": field, "code": code}}
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return {"error": error, "request_id": request_id}


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict | None = None,
    **extra,
) -> JSONResponse:
    body = error_body(request.url.path, status, code, message, request_id_of(request), field, **extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_type(status: int) -> str:
    if status in (401, 403):
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _field_path(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


# Fields of the other API families (and common slips), by what they are called on the native API.
_OTHER_NAMES = {
    "steps": ("num_inference_steps", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "cfg_scale": ("guidance_scale", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "sampler_name": ("scheduler", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "sampler_index": ("scheduler", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "batch_size": ("num_images", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "n_iter": ("num_images", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "denoising_strength": ("strength", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "init_images": ("init_image", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "size": ("width and height", "the OpenAI API's name (/v1/images/generations)"),
    "n": ("num_images", "the OpenAI API's name (/v1/images/generations)"),
    "sampler": ("scheduler", None),
    "cfg": ("guidance_scale", None),
    "guidance": ("guidance_scale", None),
    "negative": ("negative_prompt", None),
}
# The field names of each family's requests, for the names their callers use in messages.
_FAMILY_NAMES = {
    OPENAI_PREFIX: {"n": "num_images"},
    "/sdapi/": {"steps": "num_inference_steps", "cfg_scale": "guidance_scale", "batch_size": "num_images"},
}


def _unknown_field(field: str, known: set[str]) -> str:
    """'unknown field', and what the caller probably meant."""
    name = field.rsplit(".", 1)[-1]
    if name in _OTHER_NAMES:
        meant, where = _OTHER_NAMES[name]
        return f"unknown field; did you mean {meant}?" + (f" ({name} is {where})" if where else "")
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"unknown field; did you mean {close[0]}?" if close else "unknown field"


def validation_problems(
    exc: RequestValidationError,
    path: str = "",
    limits=None,
    known: set[str] = frozenset(),
    fields: dict[str, list] | None = None,
) -> list[dict]:
    """One problem per error: the field as the caller named it, and a message that says what to send.
    A number that breaks one of its field's constraints gets the field's whole rule ("must be a multiple
    of 8 from 64 to 256"), so one fix is enough: the constraints declared on the field (`fields`, from
    `request_fields`; the shared `ImageParams` when not given) with this deployment's range in place of
    the schema's outer one where it has one (`limits.bounds()`)."""
    family = next((names for prefix, names in _FAMILY_NAMES.items() if path.startswith(prefix)), {})
    bounds = limits.bounds() if limits is not None else {}
    fields = fields or {"body": [(getattr(exc, "model", None) or ImageParams, [])]}
    problems = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        field = _field_path(loc)
        kind = error.get("type")
        message = error.get("msg", "invalid").removeprefix("Value error, ")
        name = field.rsplit(".", 1)[-1]
        canonical = family.get(name, name)
        rule = None
        if kind in _RULE_ERRORS or kind in _NUMBER_ERRORS:
            rule = _rule(_declared_constraints(fields, loc), bounds.get(canonical))
        if kind == "extra_forbidden":
            message = _unknown_field(field, known)
        elif rule is not None and name == "seed" and error.get("input") in (-1, "-1"):
            message = f"must be {rule}; leave seed out (or send null) for a random seed"
        elif rule is not None and kind in _NUMBER_ERRORS:  # not a number at all: what it is, and what it must be
            message = f"{message}; must be {rule}"
        elif rule is not None:
            message = f"must be {rule} (got {_shown(error.get('input'))})"
        problems.append({"field": field, "message": message})
    return problems


# -- a field's whole rule ---------------------------------------------------------------------------
# Pydantic names the one constraint a value broke ("Input should be a multiple of 8"); a caller who fixes
# only that meets the next one. The rule is read from the declarations instead: Field(ge=..., ...) and
# Annotated[..., Field(...)] through Optional, unions, lists and nested models, along the error's loc.

_RULE_ERRORS = ("greater_than_equal", "greater_than", "less_than_equal", "less_than", "multiple_of")
_NUMBER_ERRORS = ("int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "finite_number")
_CONSTRAINTS = ("ge", "gt", "le", "lt", "multiple_of")
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def request_fields(request: Request, exc: RequestValidationError) -> dict[str, list]:
    """Where a validation error's loc starts, for the route that raised it: location ("body", "query", ...)
    -> candidates, each (annotation, field metadata); a parameters-by-name dict stands for an annotation.
    A body validated by `validate_or_422` carries its model; FastAPI's own come from the route."""
    model = getattr(exc, "model", None)
    if model is not None:
        return {"body": [(model, [])]}
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return {}

    def by_name(params) -> dict:
        return {p.alias: (p.field_info.annotation, list(p.field_info.metadata)) for p in params}

    body = dependant.body_params
    return {
        # One body parameter is the body itself (loc body.width), unless embedded (loc body.<name>.width).
        "body": ([(body[0].field_info.annotation, [])] if len(body) == 1 else []) + [(by_name(body), [])],
        "query": [(by_name(dependant.query_params), [])],
        "path": [(by_name(dependant.path_params), [])],
        "header": [(by_name(dependant.header_params), [])],
        "cookie": [(by_name(dependant.cookie_params), [])],
    }


def _declared_constraints(fields: dict[str, list], loc: tuple) -> dict[str, float]:
    """The numeric constraints declared on the field at `loc` ({} when it cannot be found)."""
    where, parts = (loc[0], loc[1:]) if loc and loc[0] in _LOCATIONS else ("body", loc)
    candidates = fields.get(where, [])
    for part in parts:
        candidates = [child for candidate in candidates for child in _children(candidate[0], part)]
    for annotation, metadata in candidates:
        found = _constraints(metadata)
        for _, inner in _members(annotation):
            found = {**_constraints(inner), **found}  # the field's own declaration wins over its type's
        if found:
            return found
    return {}


def _members(annotation) -> list[tuple[object, list]]:
    """The types an annotation allows (Optional and unions opened), each with its Annotated metadata."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *metadata = get_args(annotation)
        return [(member, [*metadata, *more]) for member, more in _members(inner)]
    if origin is Union or origin is types.UnionType:
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [(annotation, [])]


def _children(annotation, part) -> list[tuple[object, list]]:
    """What `part` of a loc (a field name, a list index, a dict key) names inside `annotation`."""
    children = []
    for member, _ in _members(annotation):
        origin, args = get_origin(member), [a for a in get_args(member) if a is not Ellipsis]
        if isinstance(member, dict):  # parameters by name
            children += [member[part]] if part in member else []
        elif isinstance(member, type) and issubclass(member, BaseModel) and isinstance(part, str):
            children += [
                (info.annotation, list(info.metadata))
                for name, info in member.model_fields.items()
                if part in (name, info.alias, info.validation_alias)
            ]
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
            children.append((args[min(part, len(args) - 1)] if origin is tuple else args[0], []))
        elif origin is dict and len(args) == 2:
            children.append((args[1], []))
    return children


def _constraints(metadata: list) -> dict[str, float]:
    found = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found.update(_constraints(item.metadata))
            continue
        for key in _CONSTRAINTS:
            value = getattr(item, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = value
    return found


def _rule(constraints: dict[str, float], bounds: tuple[float, float] | None = None) -> str | None:
    """The rule in words ("a multiple of 8 from 64 to 256", "between 1 and 50", "greater than 0 and at most
    1"); `bounds`, the deployment's inclusive range, replaces the declared one. None when nothing is declared."""
    if bounds is not None:
        constraints = {"ge": bounds[0], "le": bounds[1], **_only(constraints, "multiple_of")}
    lower = next((k for k in ("ge", "gt") if k in constraints), None)
    upper = next((k for k in ("le", "lt") if k in constraints), None)
    multiple = constraints.get("multiple_of")
    if (lower, upper) == ("ge", "le"):
        low, high = _number(constraints["ge"]), _number(constraints["le"])
        span = f"from {low} to {high}" if multiple is not None else f"between {low} and {high}"
    else:
        words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
        span = " and ".join(f"{words[k]} {_number(constraints[k])}" for k in (lower, upper) if k is not None)
    if multiple is None:
        return span or None
    separator = " " if span.startswith("from") else ", "
    return f"a multiple of {_number(multiple)}" + (separator + span if span else "")


def _only(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k in keys}


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value) -> str:
    return _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _malformed(exc: RequestValidationError, request: Request, body: bytes) -> tuple[int, str] | None:
    """A body that is not what the route reads: a status and a message saying what went wrong and where."""
    errors = exc.errors()
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    for error in errors:
        if error.get("type") == "json_invalid":
            position = error.get("loc", (None, None))[-1]
            where = ""
            if isinstance(position, int):
                before = body[:position].decode("utf-8", "replace")
                where = f" at line {before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}"
            reason = (error.get("ctx") or {}).get("error", "not valid JSON")
            return 400, f"request body is not valid JSON: {reason}{where}"
    # A body FastAPI did not parse as JSON (another Content-Type, or none) reaches the model as bytes.
    unparsed = any(
        tuple(e.get("loc", ())) == ("body",)
        and e.get("type") in ("missing", "model_attributes_type")
        and isinstance(e.get("input"), (bytes, type(None)))
        for e in errors
    )
    if unparsed and body and content_type != "application/json" and not content_type.startswith("multipart/"):
        got = f"Content-Type {content_type}" if content_type else "no Content-Type"
        return 415, f"send the body as JSON with Content-Type: application/json (it came with {got})"
    body_missing = any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors)
    if body_missing or any(e.get("type") == "model_attributes_type" for e in errors):
        return 400, "request body must be a JSON object"
    return None


async def _body_if_unread(request: Request) -> bytes:
    """The raw body, to say where JSON broke; a multipart body was streamed into its form, never kept."""
    try:
        return await request.body()
    except RuntimeError:  # "Stream consumed"
        return b""


def install_error_handlers(app: FastAPI, known_fields: set[str] = frozenset()) -> None:
    """`known_fields`: every field name the API accepts, for "did you mean ...?" on unknown ones."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        malformed = _malformed(exc, request, await _body_if_unread(request))
        if malformed is not None:
            status, message = malformed
            code = "unsupported_media_type" if status == 415 else "malformed_request"
            return error_response(request, status, code, message)
        service = getattr(request.app.state, "service", None)
        limits = getattr(service, "published_limits", None)
        problems = validation_problems(exc, request.url.path, limits, known_fields, request_fields(request, exc))
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return error_response(request, 422, "invalid_request", message, problems[0]["field"], details=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return error_response(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

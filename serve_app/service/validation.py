"""Validation errors in words a caller can act on: the field as the caller named it, and its whole rule.

Used by the HTTP layer for every 422 and by bulk runs for a row's message, so the same mistake reads the
same everywhere. Pydantic-only (no FastAPI): `fields` says where each error's loc starts.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..pipeline.params import ImageParams

OPENAI_PREFIX = "/v1/"


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
    errors: list[dict],
    path: str = "",
    limits=None,
    known: set[str] = frozenset(),
    fields: dict[str, list] | None = None,
) -> list[dict]:
    """One problem per pydantic error (`ValidationError.errors()`): the field as the caller named it, and a message that says what to send.
    A number that breaks one of its field's constraints gets the field's whole rule ("must be a multiple
    of 8 from 64 to 256"), so one fix is enough: the constraints declared on the field (`fields`, from
    `api.errors.request_fields` for a route; the shared `ImageParams` when not given) with this deployment's range in place of
    the schema's outer one where it has one (`limits.bounds()`)."""
    family = next((names for prefix, names in _FAMILY_NAMES.items() if path.startswith(prefix)), {})
    bounds = limits.bounds() if limits is not None else {}
    fields = fields or {"body": [(ImageParams, [])]}
    problems = []
    for error in errors:
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


def field_rule(name: str, bounds: tuple[float, float]) -> str:
    """The whole rule of an image parameter within a deployment's `bounds`: "a multiple of 8 from 64 to 256"."""
    return _rule(_declared_constraints({"body": [(ImageParams, [])]}, (name,)), bounds) or ""


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

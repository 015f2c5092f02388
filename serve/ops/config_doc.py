"""The configuration reference, generated from the pydantic models in `serve.config`: the JSON
schema of `AppArgs` (`cinevivid config --schema`) and the page `docs/configuration.md`
(`cinevivid config --markdown`), one table per section of serve_config.yaml's `args:` with each
field's type, default and bounds. A test regenerates the page and compares, so it cannot drift."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from serve.config import AppArgs

DOC_PATH = "docs/configuration.md"
REGENERATE = f"cinevivid config --markdown > {DOC_PATH}"


def schema_json() -> str:
    """The JSON schema of the app's args (serve_config.yaml's `args:`), indented."""
    return json.dumps(AppArgs.model_json_schema(), indent=2, sort_keys=True) + "\n"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(to_jsonable_python(a)) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _section_model(tp: Any) -> type[BaseModel] | None:
    """The model a field holds as a section (`X` or `X | None`), else None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(models) == 1:
            return _section_model(models[0])
    return None


def _item_model(tp: Any) -> type[BaseModel] | None:
    """The model of the items of a `list[X]` or `dict[str, X]` field, else None."""
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        return _section_model(typing.get_args(tp)[-1])
    return None


_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min length", "max_length": "max length",
           "multiple_of": "multiple of"}


def _bounds(field) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            out.append(f"pattern `{pattern}`")
    return ", ".join(out)


def _default(value: Any) -> str:
    text = json.dumps(to_jsonable_python(value))
    return f"`{text}`".replace("|", "\\|")


def _sections(model: type[BaseModel], instance: BaseModel | None, path: str) -> Iterator[str]:
    rows, later = [], []
    for name, field in model.model_fields.items():
        if instance is not None:
            value = getattr(instance, name)
        else:
            value = field.get_default(call_default_factory=True, validated_data={})
        sub = _section_model(field.annotation)
        items = _item_model(field.annotation)
        key = f"{path}.{name}" if path else name
        if sub is not None and (value is None or isinstance(value, BaseModel)):
            note = "" if value is not None else " (null by default)"
            rows.append(f"| `{name}` | section [`{key}`](#{_anchor(key)}){note} | | |")
            later.append((sub, value, key))
        elif items is not None:
            suffix = "[]" if typing.get_origin(field.annotation) is list else ".<name>"
            declared = field.get_default(call_default_factory=True, validated_data={})
            rows.append(f"| `{name}` | {_type_name(field.annotation)}: items in [`{key}{suffix}`]"
                        f"(#{_anchor(key + suffix)}) | {_default(declared)} | |")
            later.append((items, None, key + suffix))
        else:
            shown = "required" if value is PydanticUndefined else _default(value)
            rows.append(f"| `{name}` | {_type_name(field.annotation)} | {shown} | {_bounds(field)} |")
    title = path or "args"
    doc = " ".join((model.__doc__ or "").split()) if model.__doc__ and model.__doc__ is not BaseModel.__doc__ else ""
    yield f"## `{title}`\n"
    yield f"{model.__name__}{': ' + doc if doc else ''}\n"
    yield "| field | type | default | bounds |\n|---|---|---|---|"
    yield from rows
    yield ""
    for sub, value, key in later:
        yield from _sections(sub, value if isinstance(value, BaseModel) else None, key)


def _anchor(key: str) -> str:
    return "".join(c for c in key.lower() if c.isalnum() or c in "-_")


def render_markdown() -> str:
    """docs/configuration.md: every field of serve_config.yaml's `args:` with its default."""
    head = [
        "# Configuration reference",
        "",
        "<!-- Generated from the pydantic models in serve/config.py; do not edit by hand. -->",
        f"Generated from the pydantic models in `serve/config.py` (`AppArgs`); regenerate with "
        f"`{REGENERATE}` (a test fails when this page and the models disagree). The JSON schema: "
        "`cinevivid config --schema`.",
        "",
        "serve_config.yaml's `args:` validates into `AppArgs`; what a config leaves out takes the default "
        "below. Where an `ingress` field is left unset, its `CINEVIVID_*` environment variable fills it; "
        "secrets come only from the environment. The comments in serve/config.py say what each field does.",
        "",
    ]
    return "\n".join([*head, *_sections(AppArgs, AppArgs(), "")]).rstrip("\n") + "\n"


def cmd_config(args) -> int:
    import sys

    sys.stdout.write(render_markdown() if args.markdown else schema_json())
    return 0

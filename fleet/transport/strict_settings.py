"""Settings that refuse typos at every depth, for the agent and the hub alike.

Every section of a settings file is a `Section` (pydantic, unknown keys forbidden), so
`[update] enabeld = true` is refused instead of leaving updates off. Environment variables are
checked by name too (`unknown_env`): pydantic-settings reads only the names it knows and would
ignore `EHI_HUB_DATABSE_URL`. Every refusal names the key's full path and the closest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A settings section: unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (also inside `X | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def closest_key(model: type[BaseModel], path: Iterable[str | int]) -> str | None:
    """For an unknown key at `path` (its last part) under `model`: the nearest valid key's full
    path, if one is near enough to be a typo."""
    parts = [str(x) for x in path]
    m: type[BaseModel] | None = model
    for p in parts[:-1]:
        field = m.model_fields.get(p) if m is not None else None
        m = _model_of(field.annotation) if field is not None else None
        if m is None:
            return None
    if m is None:
        return None
    near = difflib.get_close_matches(parts[-1], list(m.model_fields), n=1, cutoff=0.6)
    return ".".join([*parts[:-1], near[0]]) if near else None


def describe_errors(model: type[BaseModel], errors: list[Any]) -> list[str]:
    """A pydantic ValidationError's errors as lines naming each key's full path; an unknown
    key with the closest valid one."""
    lines = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        where = ".".join(loc) or "(settings)"
        if e.get("type") == "extra_forbidden":
            near = closest_key(model, loc)
            lines.append(f"  {where}: unknown setting" + (f"; did you mean {near}?" if near
                                                         else ""))
        else:
            lines.append(f"  {where}: {e.get('msg')}")
    return lines


def unknown_env(model: type[BaseModel], prefix: str, environ: Mapping[str, str],
                delimiter: str = "__", exempt: frozenset[str] = frozenset()) -> list[str]:
    """Environment variables starting with `prefix` that name no setting, each with the
    closest valid name (pydantic-settings would ignore them)."""
    out = []
    for name in sorted(environ):
        if not name.upper().startswith(prefix.upper()) or name.upper() in exempt:
            continue
        parts = name[len(prefix):].lower().split(delimiter)
        m: type[BaseModel] | None = model
        for i, p in enumerate(parts):
            field = m.model_fields.get(p) if m is not None else None
            if field is None:
                near = closest_key(model, parts[:i + 1]) if m is not None else None
                hint = (f"; did you mean {prefix}{near.replace('.', delimiter).upper()}?"
                        if near else "")
                out.append(f"  {name}: names no setting{hint}")
                break
            m = _model_of(field.annotation)
            if m is None:
                if i < len(parts) - 1:  # a plain setting has no parts below it
                    out.append(f"  {name}: {'.'.join(parts[:i + 1])} has no parts")
                break
    return out

"""A strict loader that builds (nested) dataclasses from parsed YAML.

Recipes and objective configs are plain dataclasses; this module fills them from dicts and
refuses anything it cannot place, with one-line errors that name the dotted key:

    recipe key 'train.lr_rate' is unknown; allowed: batch_size, epochs, lr, ...; did you mean 'lr'?
    recipe key 'train.epochs' must be int, got str ('five')

Supported field types: ``int``, ``float`` (an int, or a string such as ``"1e-3"``, which
PyYAML reads as a string), ``bool``, ``str``, ``X | None``, ``typing.Literal[...]``,
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``, ``Any`` and nested dataclasses. A bool is
never accepted where a number is expected, nor a number where a bool is.

A dataclass's ``__post_init__`` checks field combinations. It names keys with
:func:`key_path` (or raises :func:`invalid`), which gives the full dotted path while
:func:`from_dict` builds that dataclass and the bare field name otherwise. Any other
``ValueError`` it raises is re-raised as a :class:`RecipeError` prefixed with the path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

# Dotted path of the dataclass that from_dict is constructing ("" for the root or outside).
_BUILDING: ContextVar[str] = ContextVar("unlearn_recipe_building", default="")


class RecipeError(ValueError):
    """A recipe (or config) that cannot be used; the message is one line naming the key."""


# -- helpers for __post_init__ checks ---------------------------------------------------------
def key_path(name: str) -> str:
    """The dotted recipe key of field ``name`` of the dataclass being built.

    Inside :func:`from_dict` this is e.g. ``"task.retain_split"``; when the dataclass is built
    directly in Python it is just ``"retain_split"``.
    """
    base = _BUILDING.get()
    return f"{base}.{name}" if base else name


def invalid(name: str, message: str) -> RecipeError:
    """``RecipeError("recipe key '<path of name>' <message>")``, for ``raise invalid(...)``."""
    return RecipeError(f"recipe key '{key_path(name)}' {message}")


def suggest(name: Any, choices: Iterable) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``.

    Besides spelling (difflib), a choice that is one of the ``_``-separated words of ``name``
    counts as close, so ``lr_rate`` suggests ``lr``.
    """
    choices = [str(c) for c in choices]
    name = str(name)
    close = difflib.get_close_matches(name, choices, n=1)
    if not close:
        words = {w for w in name.lower().split("_") if len(w) > 1}
        close = [c for c in choices if c.lower() in words or (len(c) > 3 and c in name)]
    return f"; did you mean {close[0]!r}?" if close else ""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key(path: str) -> str:
    return f"recipe key '{path}'" if path else "recipe"


def _got(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} ({text})"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        inner = args[0] if args else Any
        return "a list" if inner is Any else f"a list of {_type_name(inner)}"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


# -- the loader -------------------------------------------------------------------------------
def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (a mapping), checking every key and value.

    Args:
        cls: a dataclass type; nested dataclass fields are built recursively.
        data: the mapping, e.g. parsed YAML. ``None`` is not accepted (write ``{}``).
        path: the dotted key of ``data`` inside the recipe, used in messages (``""`` = root).

    Returns:
        An instance of ``cls``. Values of type ``Any`` are deep-copied, never shared with ``data``.

    Raises:
        RecipeError: unknown key, wrong type, missing required field, or a ``ValueError``
            from the dataclass's ``__post_init__``.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{_key(path)} must be a mapping, got {_got(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            allowed = ", ".join(sorted(fields)) or "(none)"
            raise RecipeError(f"recipe key '{_join(path, str(k))}' is unknown; allowed: {allowed}" + suggest(k, fields))
    kwargs = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"recipe key '{sub}' is required (it has no default)")
    token = _BUILDING.set(path)
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(f"{_key(path)} is invalid: {e}") from e
    finally:
        _BUILDING.reset(token)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return copy.deepcopy(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if _is_union(tp):
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"{_key(path)} must be {_type_name(tp)}, got null")
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            try:
                return _convert(members[0], value, path)
            except RecipeError as e:  # "must be int, got str" -> "must be int or null, got str"
                msg = str(e)
                if not msg.startswith(f"{_key(path)} must be ") or ", got " not in msg:
                    raise
                raise RecipeError(msg.replace(", got ", " or null, got ", 1)) from None
        # Members are tried in declared order: ``float | str`` reads "1e-3" as a float.
        errors = []
        for member in members:
            try:
                return _convert(member, value, path)
            except RecipeError as e:
                errors.append(e)
        deeper = [e for e in errors if not str(e).startswith(f"{_key(path)} must be")]
        if deeper:  # e.g. one item of a list was wrong: that message is the useful one
            raise deeper[0]
        raise RecipeError(f"{_key(path)} must be {_type_name(tp)}, got {_got(value)}")

    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        raise RecipeError(
            f"{_key(path)} must be one of {', '.join(repr(a) for a in args)}, got {_got(value)}"
            + (suggest(value, args) if isinstance(value, str) else "")
        )

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{_key(path)} must be bool (true/false), got {_got(value)}")

    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{_key(path)} must be int, got {_got(value)}")

    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                out = None
        if out is None:
            raise RecipeError(f"{_key(path)} must be float, got {_got(value)}")
        if not math.isfinite(out):
            raise RecipeError(f"{_key(path)} must be a finite float, got {_got(value)}")
        return out

    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{_key(path)} must be str, got {_got(value)}")

    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{_key(path)} must be {_type_name(tp)}, got {_got(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise RecipeError(f"{_key(path)} must be a list of {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items

    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{_key(path)} must be a mapping, got {_got(value)}")
        key_tp, val_tp = args if args else (str, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                raise RecipeError(f"{_key(path)} keys must be str, got {_got(k)}")
            out[k] = _convert(val_tp, v, _join(path, str(k)))
        return out

    raise TypeError(f"{_key(path)}: field type {tp!r} is not supported by unlearn.config")


# -- recording and overriding -----------------------------------------------------------------
def to_dict(instance: Any) -> Any:
    """Plain dicts/lists/scalars from a (nested) dataclass, such that ``from_dict`` accepts the
    result and builds an equal instance (used to record the resolved recipe)."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance) if f.init}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, Mapping):
        return {k: to_dict(v) for k, v in instance.items()}
    return copy.deepcopy(instance)


def apply_overrides(data: Mapping, overrides: Iterable[str]) -> dict:
    """Return a copy of ``data`` with ``--set`` overrides written in (``data`` is not modified).

    Each override is ``dotted.key=value``; the value is parsed with ``yaml.safe_load``
    (``train.lr=1e-4``, ``train.max_steps=null``, ``task.eval_splits=[forget]``; an empty
    value is null). Missing intermediate mappings are created; a key that the recipe does not
    know is reported by :func:`from_dict` afterwards, like any other unknown key.

    Raises:
        RecipeError: an override without ``=``, with an empty key part, with a value that
            is not valid YAML, or that would descend into a value that is not a mapping.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.path=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"override {item!r} has an empty key part; write e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise RecipeError(f"override {item!r}: recipe key '{where}' is {_got(child)}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out

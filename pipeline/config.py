"""Config system: frozen dataclasses, TOML files and dotted command-line overrides.

One load path for every job, each layer changing only the keys it names:

    code defaults < preset (jobs/configs/<job>/<preset>.toml) < --config FILE < --section.field=value

A preset is a named recipe shipped with the code, so it holds only the keys that differ from the code
defaults (tests/test_presets.py enforces that); ``--config`` is the user's own file (or a run directory's
resolved ``config.toml``) and goes on top of it, and command-line overrides win over both. Each component
owns a small frozen dataclass beside its code; run configs compose them. Unknown keys and badly typed
values raise :class:`ConfigError` naming the key (and the file it came from).

    cfg = load_config(TrainConfig, job="pretrain", preset="debug", overrides=["--optim.lr=3e-4"])
    print(to_toml(cfg))
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PRESET_ROOT = Path(__file__).resolve().parents[1] / "jobs" / "configs"
"""Preset files: ``PRESET_ROOT / <job> / <preset>.toml`` (``<job>`` is e.g. ``pretrain`` or ``finetune/depth``)."""


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and where it came from."""


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(source: str | None) -> str:
    return f" (in {source})" if source else ""


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Convert a TOML / CLI value to the annotated type, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = _describe(source)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}{where}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{where}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}{where}")
        return _build(tp, value, key, source)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_literal(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}{where}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}{where}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}{where}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}{where}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}{where}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"{key}: expected an integer, got {value!r}{where}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}{where}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}{where}")
    return value


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.startswith("[") and text.endswith("]"):
            inner = text[1:-1].strip()
            return [s.strip() for s in inner.split(",")] if inner else []
        return text


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, source: str | None, base: Any = None) -> T:
    """``cls`` from ``data``; keys it does not name keep their value in ``base`` (or the field default).

    A table for a nested config changes only the keys it names: ``--optim.lr=1e-4`` keeps the rest of the
    ``optim`` default, including values a ``default_factory`` set (e.g. a stage's ``layer_decay``).
    """
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"unknown key {full!r}{_describe(source)}; valid keys here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        nested = getattr(base, key) if base is not None else None
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            nested = nested if base is not None else _field_default(fields[key])
            if isinstance(nested, tp):
                kwargs[key] = _build(tp, value, full, source, nested)
                continue
        kwargs[key] = _coerce(value, tp, full, source)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}{_describe(source)}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (tuples become lists), for TOML / JSON."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(cfg)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["--optim.lr=3e-4", "train.steps=10"]`` -> ``{"optim": {"lr": "3e-4"}, "train": {"steps": "10"}}``.

    Values stay strings; the dataclass field types decide how they are read.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.field=value")
        key, value = text.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return tree


def preset_names(job: str) -> list[str]:
    """The presets shipped for ``job``: the ``*.toml`` file names in ``jobs/configs/<job>/``."""
    return sorted(p.stem for p in (PRESET_ROOT / job).glob("*.toml"))


def preset_path(job: str, name: str) -> Path:
    """The file of preset ``name`` of ``job``; a ConfigError lists the shipped ones when it does not exist."""
    path = PRESET_ROOT / job / f"{name}.toml"
    if not path.is_file():
        names = ", ".join(preset_names(job)) or "none"
        raise ConfigError(
            f"preset: {job} has no preset {name!r} (shipped: {names}; files in {PRESET_ROOT / job})"
        )
    return path


def preset_summary(job: str, name: str) -> str:
    """The first comment line of a preset file (what the recipe is), for ``--help``."""
    for line in preset_path(job, name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: T | None = None,
    *,
    job: str | None = None,
    preset: str | None = None,
) -> T:
    """Build ``cls`` from code defaults (or ``base``) < preset file < TOML file at ``path`` < ``overrides``.

    ``preset`` names ``jobs/configs/<job>/<preset>.toml``. Each layer's keys are checked on their own, so an
    error names the file (or "command line") that holds the bad key.
    """
    data: dict[str, Any] = _strip_none(to_dict(base)) if base is not None else {}
    layers: list[tuple[dict[str, Any], str]] = []
    if preset is not None:
        if job is None:
            raise ConfigError(f"preset: {preset!r} given without the job it belongs to")
        file = preset_path(job, preset)
        layers.append((_read_toml(file), str(file)))
    if path is not None:
        layers.append((_read_toml(path), str(path)))
    if overrides:
        layers.append((parse_overrides(overrides), "command line"))
    sources = []
    for layer, source in layers:
        _build(cls, _merge(data, layer), "", source)  # an error here belongs to this layer
        data = _merge(data, layer)
        sources.append(source)
    return _build(cls, data, "", " + ".join(sources) or None)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(cfg: Any) -> str:
    """The resolved config as TOML (``None`` fields are left out, so they load back as defaults)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], name: str) -> None:
        scalars = {k: v for k, v in table.items() if v is not None and not _is_table(v)}
        tables = {k: v for k, v in table.items() if _is_table(v)}
        if name and (scalars or not tables):
            lines.append(f"[{name}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        if scalars or (name and not tables):
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{name}.{k}" if name else k)

    emit(to_dict(cfg), "")
    return "\n".join(lines).rstrip() + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, type, default)`` for every field, for ``--help`` text."""
    rows = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        type_name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        rows.append((key, type_name, repr(default)))
    return rows


def help_text(cls: type) -> str:
    """One line per config key, with type and default, plus the field's doc comment when it has one."""
    docs = field_docs(cls)
    width = max((len(k) for k, _, _ in field_help(cls)), default=10)
    out = []
    for key, tp, default in field_help(cls):
        doc = docs.get(key, "")
        out.append(f"  --{key:<{width}}  {tp} = {default}" + (f"  {doc}" if doc else ""))
    return "\n".join(out)


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Field docstrings (a string literal right after a field, as torchtitan writes them)."""
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError):
        tree = None
    if tree is not None and tree.body and isinstance(tree.body[0], ast.ClassDef):
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[prefix + node.target.id] = " ".join(nxt.value.value.split())
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
    return docs

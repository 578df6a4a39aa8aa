"""One declaration per setting.

A setting is a field of a settings dataclass (``TrainConfig``, the estimator's own column
settings) declared with ``setting(default, doc, ...)``. Everything else is generated from that
one declaration: the pyspark.ml ``Param`` (``spark_ddl.params``), the estimator's keyword
argument, whether ``None`` is allowed, the command-line flag (``add_arguments``) and the
per-value check (``check``). Cross-setting rules stay in the dataclass's ``validate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from spark_ddl.errors import ConfigError

Choices = tuple[str, ...] | Callable[[], Iterable[str]]


@dataclass(frozen=True)
class Setting:
    """What one setting accepts and how it shows up outside its dataclass."""

    doc: str
    kind: type  # int, float, str, bool, dict, list, or object (anything; checked by validate)
    nullable: bool = False  # None is a meaningful value (e.g. "off", "auto")
    choices: Choices | None = None  # allowed strings; a callable (read when needed) may return
    # a mapping of name -> description (a registry)
    minimum: float | None = None  # ints: value >= minimum; floats: see positive
    positive: bool = False  # floats: value > 0
    unit: str = ""  # "seconds": appears in messages
    callable_ok: bool = False  # a callable is accepted besides the choices (e.g. a custom loss)
    param: bool = True  # exposed as an estimator Param (False: set by the driver itself)
    cli: bool = True  # a flag of the training command
    cli_aliases: tuple[str, ...] = ()  # extra flag spellings kept for compatibility
    resume_checked: bool = False  # must be equal for a checkpoint to continue a run

    def allowed(self) -> tuple[str, ...]:
        """The allowed strings (empty when any value of ``kind`` goes)."""
        if self.choices is None:
            return ()
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        """The documentation, with each choice's description when the choices have one."""
        choices = self.choices() if callable(self.choices) else None
        if isinstance(choices, Mapping):
            return f"{self.doc}: " + "; ".join(f"'{name}' {text}" for name, text in choices.items())
        return self.doc

def setting(default: Any = dataclasses.MISSING, doc: str = "", *, kind: type | None = None,
            default_factory: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field declaring one setting (``kind`` defaults to the default's type)."""
    if kind is None:
        sample = default_factory() if default_factory is not dataclasses.MISSING else default
        kind = type(sample) if sample is not None else object
    meta = {"setting": Setting(doc=doc, kind=kind, **spec)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls_or_instance: Any) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """The settings a dataclass declares, by name, in declaration order."""
    return {f.name: (f, f.metadata["setting"]) for f in dataclasses.fields(cls_or_instance)
            if "setting" in f.metadata}


def default_of(field: dataclasses.Field) -> Any:
    """The field's default value (a fresh one for mutable defaults)."""
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


def check(name: str, spec: Setting, value: Any) -> None:
    """Raise ConfigError naming ``name`` when ``value`` is not what ``spec`` accepts."""
    if value is None:
        if spec.nullable:
            return
        raise ConfigError(f"{name} must be set (None is not allowed).")
    if spec.callable_ok and callable(value):
        return
    allowed = spec.allowed()
    if allowed:
        if value not in allowed:
            extra = " or a callable" if spec.callable_ok else ""
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}{extra}, got {value!r}.")
        return
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be {'None, ' if spec.nullable else ''}True or False, got {value!r}.")
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
        if spec.minimum is not None and value < spec.minimum:
            raise ConfigError(f"{name} must be >= {spec.minimum:g}, got {value}.")
    elif spec.kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        unit = f" of {spec.unit}" if spec.unit else ""
        if spec.positive and not (number and value > 0):
            none = " or None" if spec.nullable else ""
            raise ConfigError(f"{name} must be a positive number{unit}{none}, got {value!r}.")
        if not number or (spec.minimum is not None and value < spec.minimum):
            bound = f" >= {spec.minimum:g}" if spec.minimum is not None else ""
            raise ConfigError(f"{name} must be a number{bound}{unit}, got {value!r}.")
    elif spec.kind in (dict, list, str) and not isinstance(value, spec.kind):
        raise ConfigError(f"{name} must be a {spec.kind.__name__}, got {type(value).__name__}.")


def check_all(instance: Any) -> None:
    """``check`` every declared setting of a settings dataclass instance."""
    for name, (_, spec) in declared(instance).items():
        check(name, spec, getattr(instance, name))


# ------------------------------------------------------------------ command-line flags


def _parse_cli_value(kind: type, nullable: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if nullable and text.lower() in ("none", "null"):
            return None
        if kind in (dict, list):
            return json.loads(text)
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is object:  # e.g. checkpoint_every: 2 or "500 steps"
            return int(text) if text.strip().isdigit() else text
        return text

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_arguments(parser: argparse.ArgumentParser, settings: Mapping[str, tuple[dataclasses.Field, Setting]],
                  defaults: Mapping[str, Any] | None = None, skip: Iterable[str] = ()) -> list[str]:
    """Add a ``--flag`` per setting (``--batch-size`` for ``batch_size``); return their names.

    ``defaults`` overrides a setting's default for this command (e.g. a learning rate that
    suits the command's model).
    """
    defaults, skip = dict(defaults or {}), set(skip)
    names = []
    for name, (field, spec) in settings.items():
        if not (spec.param and spec.cli) or name in skip:
            continue
        default = defaults.get(name, default_of(field))
        flags = [f"--{name.replace('_', '-')}", *spec.cli_aliases]
        help_text = spec.describe().replace("%", "%%")
        if spec.kind is bool and not spec.nullable:
            parser.add_argument(*flags, dest=name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            allowed = spec.allowed()
            parser.add_argument(*flags, dest=name, default=default, type=_parse_cli_value(spec.kind, spec.nullable),
                                choices=list(allowed) if allowed else None,
                                help=f"{help_text} (default: {default!r})")
        names.append(name)
    return names

"""One declaration per setting.

A setting is a field of a settings dataclass (``TrainConfig``, the estimator's own column
settings) declared with ``setting(default, doc, ...)``. Everything else is generated from that
one declaration: the pyspark.ml ``Param`` (``spark_ddl.ml.params``), the estimator's keyword
argument, whether ``None`` is allowed, the command-line flags (``add_arguments``), the
per-value check (``check``) and the settings reference page. Cross-setting rules stay in the
dataclass's ``validate``.

Where a setting is exposed is marked on its declaration, and read back with ``exposed``:
``param`` (an estimator Param and keyword argument; False: set by the driver itself), ``run``
(also a keyword argument of ``spark_ddl.run``), ``cli`` (the commands with a flag for it:
``"train"`` for ``spark-ddl train``, ``"apps"`` for the application commands).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from spark_ddl.errors import ConfigError

Choices = tuple[str, ...] | Callable[[], Iterable[str]]
# the command groups a setting can be a flag of (Setting.cli)
COMMANDS = {"train": "spark-ddl train",
            "apps": "the application commands (spark-ddl images, text, recommender, stream-recommender)"}


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
    run: bool = False  # also a keyword argument of spark_ddl.run
    cli: tuple[str, ...] = ("train",)  # the commands (COMMANDS) with a flag for it; (): none
    cli_aliases: tuple[str, ...] = ()  # extra flag spellings kept for compatibility
    cli_type: Callable[[str], Any] | None = None  # the flag's text -> value (default: by kind)
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
    unknown = set(spec.get("cli", ())) - set(COMMANDS)
    if unknown or isinstance(spec.get("cli"), str):
        raise ValueError(f"cli must be a tuple of {sorted(COMMANDS)}, got {spec['cli']!r}")
    meta = {"setting": Setting(doc=doc, kind=kind, **spec)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls_or_instance: Any) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """The settings a dataclass declares, by name, in declaration order."""
    return {f.name: (f, f.metadata["setting"]) for f in dataclasses.fields(cls_or_instance)
            if "setting" in f.metadata}


def exposed(settings: Any, where: str) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """The user settings (``param``) of a settings dataclass, or of a ``declared`` mapping, that are
    exposed ``where``: ``"param"`` (every one), ``"run"`` (``spark_ddl.run``), or a command group
    of ``COMMANDS`` (its flags)."""
    if where not in ("param", "run", *COMMANDS):
        raise ValueError(f"where must be 'param', 'run' or one of {sorted(COMMANDS)}, got {where!r}")
    settings = settings if isinstance(settings, Mapping) else declared(settings)
    return {name: (field, spec) for name, (field, spec) in settings.items() if spec.param and (
        where == "param" or (spec.run if where == "run" else where in spec.cli))}


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


def comma_separated(text: str) -> list[str]:
    """A flag's list of names: ``"a, b"`` -> ``["a", "b"]`` (a ``cli_type``)."""
    return [part.strip() for part in text.split(",") if part.strip()]


comma_separated.metavar = "NAME[,NAME...]"  # type: ignore[attr-defined]


def add_arguments(parser: argparse.ArgumentParser, settings: Mapping[str, tuple[dataclasses.Field, Setting]],
                  command: str, defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Add a ``--flag`` (``--batch-size`` for ``batch_size``) for each of ``settings`` marked as a
    flag of ``command`` (a group of ``COMMANDS``); return their names.

    ``defaults`` overrides a setting's default for this command (e.g. a learning rate that
    suits the command's model); the help shows the command's default.
    """
    flagged, defaults = exposed(settings, command), dict(defaults or {})
    stray = sorted(set(defaults) - set(flagged))
    if stray:
        raise ValueError(f"defaults for settings without a {command!r} flag: {stray}")
    for name, (field, spec) in flagged.items():
        default = defaults.get(name, default_of(field))
        flags = [f"--{name.replace('_', '-')}", *spec.cli_aliases]
        help_text = spec.describe().replace("%", "%%")
        if spec.kind is bool and not spec.nullable:
            parser.add_argument(*flags, dest=name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            allowed = spec.allowed()
            parser.add_argument(*flags, dest=name, default=default,
                                type=spec.cli_type or _parse_cli_value(spec.kind, spec.nullable),
                                metavar=getattr(spec.cli_type, "metavar", None),
                                choices=list(allowed) if allowed else None,
                                help=f"{help_text} (default: {default!r})")
    return list(flagged)


def flag_values(args: argparse.Namespace, settings: Mapping[str, tuple[dataclasses.Field, Setting]],
                command: str) -> dict[str, Any]:
    """The values of ``command``'s setting flags (``add_arguments``) in parsed ``args``."""
    return {name: getattr(args, name) for name in exposed(settings, command)}

"""The settings reference page (``docs/settings.md``), generated from the declarations.

Every setting is declared once with ``setting(...)`` (``spark_ddl.common.settings``) on a settings
dataclass: ``TrainConfig`` (training), ``FitSettings`` (the estimator only) and
``ScoringSettings`` (the estimator and the model). This module writes one table per dataclass
from those declarations: name, default, documentation (with each choice's description), the
allowed values, and where the setting is exposed, read from the marks on its declaration
(``param``, ``run``, ``cli``, ``resume_checked``: an estimator ``Param``, ``spark_ddl.run``, a flag
of ``spark-ddl train`` and of the application commands, checked on resume), and each command's
own defaults (its ``COMMAND_DEFAULTS``).

    spark-ddl settings > docs/settings.md      # or: python -m spark_ddl.apps.settings_reference

``tests/unit/test_settings_reference.py`` fails when ``docs/settings.md`` is not what this
writes today, so the page cannot go stale.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from typing import Any

from spark_ddl.common.settings import Setting, declared, default_of, exposed

HEADER = """# Settings reference

Generated from the declarations (`setting(...)` in `spark_ddl/common/train_config.py` and
`spark_ddl/ml/params.py`) by `spark-ddl settings > docs/settings.md`;
`tests/unit/test_settings_reference.py` fails when this page differs from what the generator
writes. Do not edit by hand.

**Where**: `Param` — a keyword argument and `pyspark.ml` Param of `TorchEstimator`
(`explainParams()`); `model` — also a Param of `TorchModel`; `flag` — a flag of
`spark-ddl train` (`--batch-size` for `batch_size`); `apps` — a flag of the application commands
(`spark-ddl images`, `text`, `recommender`, `stream-recommender`); `run` — accepted by
`spark_ddl.run`; `resume` — must be equal for a checkpoint to continue a run; `driver` — set by
the driver itself, not by users. Each is a mark on the setting's declaration (`param`, `cli`,
`run`, `resume_checked`).
"""


def _code(value: Any) -> str:
    text = repr(value).replace("|", "\\|")
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


KINDS = {bool: "`True`/`False`", int: "an int", float: "a number", str: "a str", dict: "a dict", list: "a list"}


def _allowed(spec: Setting) -> str:
    allowed = ", ".join(f"`{name}`" for name in spec.allowed())
    if spec.callable_ok:
        allowed = f"{allowed} or a callable" if allowed else "a callable"
    if not allowed and spec.minimum is not None:
        allowed = f"≥ {spec.minimum:g}"
    if not allowed and spec.positive:
        allowed = "> 0"
    if not allowed:
        allowed = KINDS.get(spec.kind, "see the description")
    if spec.nullable:
        allowed = f"{allowed}, `None`"
    if spec.unit:
        allowed = f"{allowed} ({spec.unit})"
    return allowed


def where(name: str, spec: Setting, model_too: bool = False) -> str:
    """Where the setting is exposed, from the marks on its declaration."""
    places = []
    if not spec.param:
        places.append("driver")
    else:
        places.append("Param")
        if model_too:
            places.append("model")
        places += [label for command, label in (("train", "flag"), ("apps", "apps")) if command in spec.cli]
        if spec.run:
            places.append("run")
    if spec.resume_checked:
        places.append("resume")
    return ", ".join(places)


def table(settings_class: type, model_too: bool = False) -> list[str]:
    """The Markdown table of one settings dataclass's declared settings."""
    lines = ["| setting | default | allowed | where | what it does |", "|---|---|---|---|---|"]
    for name, (field, spec) in declared(settings_class).items():
        default = default_of(field) if (field.default is not dataclasses.MISSING
                                        or field.default_factory is not dataclasses.MISSING) else None
        cells = [f"`{name}`", _code(default), _allowed(spec), where(name, spec, model_too), _cell(spec.describe())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def command_defaults() -> dict[str, dict[str, Any]]:
    """Each command of ``spark_ddl.apps`` that declares its own defaults of some settings
    (``COMMAND_DEFAULTS``): ``spark-ddl NAME`` -> those defaults."""
    import spark_ddl.apps

    found = {}
    for module in pkgutil.iter_modules(spark_ddl.apps.__path__):
        defaults = getattr(importlib.import_module(f"spark_ddl.apps.{module.name}"), "COMMAND_DEFAULTS", None)
        if defaults is not None:
            found[f"spark-ddl {module.name.replace('_', '-')}"] = dict(defaults)
    return found


def _names(names: Any) -> str:
    return ", ".join(f"`{name}`" for name in names)


def render() -> str:
    """The whole page."""
    from spark_ddl.apps.options import command_settings
    from spark_ddl.common.train_config import TrainConfig
    from spark_ddl.ml.params import FitSettings, ScoringSettings

    sections = [
        ("Training (`TrainConfig`)", "The training settings: `TorchEstimator` keyword arguments and Params, "
         "`spark-ddl train` flags, and (those marked `run`) `spark_ddl.run` keyword arguments.",
         table(TrainConfig)),
        ("The estimator only (`FitSettings`)", "Settings of `TorchEstimator` besides the training ones.",
         table(FitSettings)),
        ("The estimator and the model (`ScoringSettings`)", "Settings `TorchEstimator` and `TorchModel` share "
         "(how columns become model inputs, and scoring).", table(ScoringSettings, model_too=True)),
    ]
    out = [HEADER]
    for title, text, lines in sections:
        out += [f"## {title}", "", text, "", *lines, ""]
    out += [f"`spark_ddl.run` accepts: {_names(exposed(TrainConfig, 'run'))}.", ""]
    out += ["`spark-ddl train` has a flag for each setting marked `flag`, the application commands one for each "
            "marked `apps`: "
            f"{_names(exposed(command_settings(), 'apps'))}. Where a command's own default differs from the "
            "declared one (its `COMMAND_DEFAULTS`; its `--help` shows it):", ""]
    for command, defaults in command_defaults().items():
        out.append(f"- `{command}`: {', '.join(f'`{name}={value!r}`' for name, value in defaults.items())}")
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

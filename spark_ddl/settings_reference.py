"""The settings reference page (``docs/settings.md``), generated from the declarations.

Every setting is declared once with ``setting(...)`` (``spark_ddl.settings``) on a settings
dataclass: ``TrainConfig`` (training), ``FitSettings`` (the estimator only) and
``ScoringSettings`` (the estimator and the model). This module writes one table per dataclass
from those declarations: name, default, documentation (with each choice's description), the
allowed values, and where the setting is exposed (an estimator ``Param``, a flag of
``spark-ddl train``, ``spark_ddl.run``, checked on resume).

    spark-ddl settings > docs/settings.md      # or: python -m spark_ddl.settings_reference

``tests/unit/test_settings_reference.py`` fails when ``docs/settings.md`` is not what this
writes today, so the page cannot go stale.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from spark_ddl.settings import Setting, declared, default_of

HEADER = """# Settings reference

Generated from the declarations (`setting(...)` in `spark_ddl/config.py` and
`spark_ddl/params.py`) by `spark-ddl settings > docs/settings.md`;
`tests/unit/test_settings_reference.py` fails when this page differs from what the generator
writes. Do not edit by hand.

**Where**: `Param` — a keyword argument and `pyspark.ml` Param of `TorchEstimator`
(`explainParams()`); `model` — also a Param of `TorchModel`; `flag` — a flag of
`spark-ddl train` (`--batch-size` for `batch_size`); `run` — accepted by `spark_ddl.run`;
`resume` — must be equal for a checkpoint to continue a run; `driver` — set by the driver
itself, not by users.
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


def _where(name: str, spec: Setting, model_too: bool, run_settings: tuple[str, ...],
           no_flag: tuple[str, ...] | None) -> str:
    places = []
    if not spec.param:
        places.append("driver")
    else:
        places.append("Param")
        if model_too:
            places.append("model")
        if no_flag is not None and spec.cli and name not in no_flag:
            places.append("flag")
    if name in run_settings:
        places.append("run")
    if spec.resume_checked:
        places.append("resume")
    return ", ".join(places)


def table(settings_class: type, run_settings: tuple[str, ...] = (), model_too: bool = False,
          no_flag: tuple[str, ...] | None = None) -> list[str]:
    """The Markdown table of one settings dataclass's declared settings (``no_flag``: None when
    ``spark-ddl train`` generates no flags from this dataclass, else the settings it skips)."""
    lines = ["| setting | default | allowed | where | what it does |", "|---|---|---|---|---|"]
    for name, (field, spec) in declared(settings_class).items():
        default = default_of(field) if (field.default is not dataclasses.MISSING
                                        or field.default_factory is not dataclasses.MISSING) else None
        cells = [f"`{name}`", _code(default), _allowed(spec), _where(name, spec, model_too, run_settings, no_flag),
                 _cell(spec.describe())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render() -> str:
    """The whole page."""
    from spark_ddl.apps.train import COMMAND_DEFAULTS, NO_FLAG
    from spark_ddl.config import TrainConfig
    from spark_ddl.params import FitSettings, ScoringSettings
    from spark_ddl.runner import RUN_SETTINGS

    sections = [
        ("Training (`TrainConfig`)", "The training settings: `TorchEstimator` keyword arguments and Params, "
         "`spark-ddl train` flags, and (those marked `run`) `spark_ddl.run` keyword arguments.",
         table(TrainConfig, tuple(RUN_SETTINGS), no_flag=tuple(NO_FLAG))),
        ("The estimator only (`FitSettings`)", "Settings of `TorchEstimator` besides the training ones.",
         table(FitSettings)),
        ("The estimator and the model (`ScoringSettings`)", "Settings `TorchEstimator` and `TorchModel` share "
         "(how columns become model inputs, and scoring).", table(ScoringSettings, model_too=True)),
    ]
    out = [HEADER]
    for title, text, lines in sections:
        out += [f"## {title}", "", text, "", *lines, ""]
    out.append(f"`spark_ddl.run` accepts: {', '.join(f'`{n}`' for n in RUN_SETTINGS)}.")
    out.append("")
    changed = ", ".join(f"`{name}={value!r}`" for name, value in COMMAND_DEFAULTS.items())
    out.append(f"`spark-ddl train` trains a classifier: its own defaults are {changed}, and it has no flag for "
               f"{', '.join(f'`{n}`' for n in NO_FLAG)}.")
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

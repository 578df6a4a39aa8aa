"""docs/settings.md is what spark_ddl.apps.settings_reference writes today (regenerate it with
``spark-ddl settings > docs/settings.md``)."""

from __future__ import annotations

from pathlib import Path

from spark_ddl.apps.images import parse_args as images_args
from spark_ddl.apps.settings_reference import render
from spark_ddl.apps.train import parse_args as train_args
from spark_ddl.cli import main as cli_main
from spark_ddl.common.settings import declared
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.ml.params import FitSettings, ScoringSettings
from spark_ddl.runner import RUN_SETTINGS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_settings_page_is_generated_from_the_declarations():
    assert PAGE.read_text() == render(), (
        "docs/settings.md is stale: run `spark-ddl settings > docs/settings.md`")


def test_every_training_setting_has_a_row_and_run_settings_are_marked():
    page = render()
    for name in declared(TrainConfig):
        assert f"| `{name}` |" in page
    for name in RUN_SETTINGS:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
        assert "run" in row.split(" | ")[3]


def test_the_where_column_is_what_each_surface_really_exposes():
    """Each row's `where` is checked against the surfaces themselves: spark_ddl.run's settings,
    spark-ddl train's and an application command's parsed flags."""
    page, train, app = render(), vars(train_args([])), vars(images_args([]))
    for settings_class in (TrainConfig, FitSettings, ScoringSettings):
        for name, (_, spec) in declared(settings_class).items():
            row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
            where = row.split(" | ")[3].split(", ")
            assert ("Param" in where) == spec.param and ("driver" in where) == (not spec.param), name
            assert ("run" in where) == (name in RUN_SETTINGS), name
            assert ("flag" in where) == (name in train), name
            assert ("apps" in where) == (name in app), name


def test_the_command_prints_the_page(capsys):
    assert cli_main(["settings"]) == 0
    assert capsys.readouterr().out == render()

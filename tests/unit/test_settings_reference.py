"""docs/settings.md is what spark_ddl.settings_reference writes today (regenerate it with
``spark-ddl settings > docs/settings.md``)."""

from __future__ import annotations

from pathlib import Path

from spark_ddl.cli import main as cli_main
from spark_ddl.config import TrainConfig
from spark_ddl.runner import RUN_SETTINGS
from spark_ddl.settings import declared
from spark_ddl.settings_reference import render

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


def test_the_command_prints_the_page(capsys):
    assert cli_main(["settings"]) == 0
    assert capsys.readouterr().out == render()

"""Command-line parsing shared by the apps: ``--config FILE`` (JSON or YAML) supplies option
values, and flags given on the command line override them.

The flags of estimator settings are generated from the settings' declarations
(``command_settings``, ``spark_ddl.common.settings.add_arguments``): a setting marked ``cli=(...,
"apps")`` is a flag of every application command, with its declared type, default, choices and
help; a command's own default for one is declared once, in the command's ``COMMAND_DEFAULTS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from spark_ddl.common.settings import add_arguments, flag_values


def command_settings() -> dict[str, Any]:
    """Every declared setting of the estimator (``TrainConfig``'s, then the estimator's own and
    the ones it shares with the model), by name: what the commands' setting flags come from."""
    from spark_ddl.common.settings import declared
    from spark_ddl.common.train_config import TrainConfig
    from spark_ddl.ml.params import FitSettings, ScoringSettings

    return {**declared(TrainConfig), **declared(FitSettings), **declared(ScoringSettings)}


def setting_values(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The estimator settings ``command``'s flags set (``"train"`` or ``"apps"``), by name."""
    return flag_values(args, command_settings(), command)


def application_parser(prog: str | None, doc: str | None, output: str,
                       defaults: Mapping[str, Any]) -> argparse.ArgumentParser:
    """The options every application command shares: the settings marked as flags of the
    applications (training length, agents, ...; ``defaults``: the command's own defaults of
    some), the data's sample and the output."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, command_settings(), "apps", defaults)
    p.add_argument("--sample", type=float, default=1.0, help="fraction of the data to use (CI: small)")
    p.add_argument("--output", default=output, help="model directory")
    add_session_arguments(p, "local[workers]")
    p.add_argument("--metrics-json", default=None, help="write the results here")
    add_mlflow_argument(p)
    return p


def add_session_arguments(p: argparse.ArgumentParser, embedded: str) -> None:
    """--master, and --remote for a Spark Connect server (its paths are the server's)."""
    p.add_argument("--master", default=None, help=f"Spark master (default: spark-submit's, else embedded {embedded})")
    p.add_argument("--remote", default=None, metavar="sc://HOST:PORT",
                   help="run through a Spark Connect server (needs the 'connect' extra); paths are the "
                        "server's; 'local[N]' starts a local one")


def add_mlflow_argument(p: argparse.ArgumentParser) -> None:
    """--mlflow [TRACKING_URI]: log the fit to MLflow (needs the 'mlflow' extra)."""
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="TRACKING_URI",
                   help="log the fit to MLflow (settings, per-epoch metrics, summary, model) at TRACKING_URI "
                        "(default: MLFLOW_TRACKING_URI, else MLflow's default); needs spark_ddl[mlflow]")


def mlflow_from_args(args: argparse.Namespace, experiment: str) -> Any:
    """With --mlflow: autologging on (models too) in ``experiment``; returns spark_ddl.mlflow
    (None without the flag)."""
    if getattr(args, "mlflow", None) is None:
        return None
    import spark_ddl.mlflow as ddl_mlflow

    ddl_mlflow.use(args.mlflow or None, experiment)
    ddl_mlflow.autolog(log_models=True)
    return ddl_mlflow


@contextlib.contextmanager
def mlflow_tracking(args: argparse.Namespace, experiment: str) -> Iterator[Any]:
    """``mlflow_from_args`` for the block (the fit) only: autologging is off again after it."""
    tracking = mlflow_from_args(args, experiment)
    try:
        yield tracking
    finally:
        if tracking is not None:
            tracking.autolog(disable=True)


def session_from_args(args: argparse.Namespace, app_name: str, num_workers: int = 2) -> Any:
    """The Spark session that --master / --remote ask for."""
    from spark_ddl.driver.session import get_or_create_session

    if args.remote and args.master:
        raise SystemExit("--remote and --master exclude each other: a Spark Connect server has its own master")
    return get_or_create_session(master=args.master, num_workers=num_workers, app_name=app_name, remote=args.remote)


def add_skip_baselines(p: argparse.ArgumentParser) -> None:
    """``--skip-baselines``: for the applications whose comparison models are slow to train."""
    p.add_argument("--skip-baselines", action="store_true",
                   help="leave out the logistic-regression baseline, which takes longer than the model (quick runs, CI)")


def save_results(model: Any, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Save the model to ``--output`` and, with ``--metrics-json``, the results and the history."""
    model.save(args.output, overwrite=True)
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps({**results, "history": model.history}, indent=2))
    if getattr(args, "mlflow", None) is not None:  # the held-out scores join the fit's run
        import spark_ddl.mlflow as ddl_mlflow

        numbers = {k: v for k, v in results.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run_id = ddl_mlflow.log_to_last_run(numbers)
        if run_id is not None:
            print(f"MLflow run {run_id} at {ddl_mlflow.use()}")


def setup_logging() -> None:
    """Log lines with a time stamp on stderr (progress lines arrive through logging)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)


def load_config_file(path: str) -> dict[str, Any]:
    """The mapping in a .json, .yaml or .yml file (keys may use '-' or '_')."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      required: Sequence[str] = ()) -> argparse.Namespace:
    """Parse ``argv`` with ``--config FILE`` values as defaults; ``required`` options must end up set
    (from the file or the command line)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="JSON or YAML file of option values (keys as the long flags, '-' or '_'); "
                             "flags on the command line override it")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            values = load_config_file(known.config)
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read --config {known.config}: {exc}")
        # a key names an option by its dest or by any of its flags (--workers for num_workers)
        dests = {flag.lstrip("-").replace("-", "_"): action.dest for action in parser._actions  # noqa: SLF001
                 for flag in action.option_strings if flag.startswith("--")}
        options = {action.dest for action in parser._actions}  # noqa: SLF001 - argparse has no public list
        unknown = sorted(set(values) - options - set(dests))
        if unknown:
            parser.error(f"--config {known.config} has unknown option(s) {unknown}; valid: "
                         f"{sorted(options - {'help', 'config'})}")
        parser.set_defaults(**{dests.get(key, key): value for key, value in values.items()})
    args = parser.parse_args(argv)
    missing = [name for name in required if getattr(args, name, None) in (None, "")]
    if missing:
        parser.error("missing required option(s): " + ", ".join(f"--{m.replace('_', '-')}" for m in missing))
    return args

"""Modules moved into layers (issue 26) still import under their old paths, as the same module
objects, so that saved pipelines, class paths and pickles written before the move keep loading."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from spark_ddl._moved import MOVED

ROOT = Path(__file__).resolve().parents[2]

_CHECK = """
import importlib, json, sys
import spark_ddl
out = {}
for old, new in json.loads(sys.argv[1]).items():
    moved = importlib.import_module(old)
    out[old] = [moved is importlib.import_module(new), moved.__name__, moved.__spec__.name, sys.modules[old] is moved]
print(json.dumps(out))
"""


def test_every_old_path_is_the_module_at_its_new_path_in_a_fresh_process():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    done = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(MOVED)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {old: [True, new, new, True] for old, new in MOVED.items()}


def test_the_old_paths_name_no_file_of_their_own():
    for old in MOVED:
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), old  # a stale copy would shadow the move


def test_class_paths_and_pickles_written_before_the_move_load():
    from spark_ddl.common.model_source import build_from_class_path
    from spark_ddl.common.train_config import TrainConfig
    from spark_ddl.networks import MLP

    assert type(build_from_class_path("spark_ddl.models:MLP", {"in_features": 3, "out_features": 2})) is MLP
    # a pickle made before the move names spark_ddl.config.TrainConfig
    old = pickle.dumps(TrainConfig(epochs=3), protocol=0).replace(  # protocol 0: names as text lines
        b"spark_ddl.common.train_config", b"spark_ddl.config")
    assert b"spark_ddl.config" in old
    assert pickle.loads(old) == TrainConfig(epochs=3)


def test_an_unknown_old_looking_path_still_fails():
    with pytest.raises(ModuleNotFoundError):
        __import__("spark_ddl.no_such_module")

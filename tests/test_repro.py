import json
import random
import subprocess

import numpy as np
import pytest
import torch

from coalora.repro import atomic_path, git_commit, provenance, seed_everything, write_json_atomic


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_same_seed_same_numbers_different_seed_different():
    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert draws() == first
    seed_everything(8)
    assert draws() != first


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        seed_everything(seed)


def test_provenance_record_is_complete_and_json_ready():
    record = provenance({"preset": "smoke", "budget": 3.0}, seed=1)
    assert record["parameters"] == {"preset": "smoke", "budget": 3.0} and record["seed"] == 1
    assert len(record["git"]["commit"]) == 40  # the test suite runs from a git checkout
    assert record["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["device"].startswith(("cpu:", "cuda:"))
    json.dumps(record)


def test_regenerated_outputs_do_not_make_the_checkout_dirty_but_code_changes_do(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a\n1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "results" / "table.csv").write_text("a\n2\n")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    state = git_commit(tmp_path)
    assert state["dirty"] is True and len(state["commit"]) == 40
    assert git_commit(tmp_path / "not-a-repo") == {"commit": "unknown", "dirty": None}


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "out" / "result.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_interrupted_atomic_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"]

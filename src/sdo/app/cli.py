"""The ``sdo`` command line: ``sdo demo | optimize | train-zoo``. Task flags are generated from config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sdo import __version__
from sdo.errors import DISTRIBUTION, SdoError


def add_config_flags(parser: argparse.ArgumentParser, config_cls, defaults: dict | None = None, exclude=()) -> None:
    """One ``--flag`` per dataclass field (type, default, help and choices taken from the field)."""
    defaults = defaults or {}
    for item in dataclasses.fields(config_cls):
        if item.name in exclude:
            continue
        default = defaults.get(item.name, item.default)
        if item.metadata.get("action") == "append":  # a repeatable flag: a tuple field, one value per use
            parser.add_argument(
                f"--{item.name.replace('_', '-')}",
                dest=item.name,
                action="append",
                default=list(default),
                help=item.metadata.get("help", ""),
            )
            continue
        if isinstance(default, bool):
            parser.add_argument(
                f"--{item.name.replace('_', '-')}",
                dest=item.name,
                default=default,
                action=argparse.BooleanOptionalAction,
                help=item.metadata.get("help", ""),
            )
            continue
        parser.add_argument(
            f"--{item.name.replace('_', '-')}",
            dest=item.name,
            type=item.metadata.get("type", type(default)),
            default=default,
            choices=item.metadata.get("choices"),
            help=item.metadata.get("help", "") + ("" if default is None else f" (default: {default})"),
        )


def _fields_of(args: argparse.Namespace, config_cls) -> dict:
    """The parsed flags that are fields of ``config_cls``."""
    names = {item.name for item in dataclasses.fields(config_cls)}
    return {key: value for key, value in vars(args).items() if key in names}


def _config_from(args: argparse.Namespace, config_cls):
    return config_cls(**_fields_of(args, config_cls))


def _demo(args: argparse.Namespace) -> int:
    from sdo.app.demo import demo_config, format_table, run_demo
    from sdo.app.tasks.latent import LatentTaskConfig

    config = demo_config(**_fields_of(args, LatentTaskConfig))
    print(f"sdo demo: {config.steps} DDIM steps, batch {config.batch}, {config.iters} Adam iterations per method")
    metrics = run_demo(config)
    print(f"\nTask: {metrics['task']}\n")
    print(format_table(metrics["methods"]))
    if "s_per_iter_sdo_over_full" in metrics:
        print(
            f"\nsdo / full: {metrics['s_per_iter_sdo_over_full']:.2f}x seconds per iteration, "
            f"{metrics['peak_mem_sdo_over_full']:.3f}x extra memory"
        )
    out = Path(config.out)
    print(
        f"\nWrote {out / 'grid.png'}, {out / 'curves.png'}, {out / 'metrics.json'} "
        f"({metrics['total_seconds']:.1f} s in all)"
    )
    return 0


def _optimize(args: argparse.Namespace) -> int:
    import torch

    from sdo.app.demo import format_table, summarize
    from sdo.app.plots import save_curves, save_image_grid
    from sdo.app.tasks.latent import LatentTaskConfig, build_task, run_task
    from sdo.io import save_json
    from sdo.latent import save_latent

    config = _config_from(args, LatentTaskConfig)
    if config.conditions or config.prompts:
        return _optimize_items(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    task = build_task(config)
    print(f"Task: {task.description} ({config.method}, {config.steps} steps)")
    for note in task.record.get("notes", []):
        print(f"Note: {note}")
    result = run_task(config, task)
    out = Path(config.out)
    save_latent(out / "latent.safetensors", result.latent, **{**dataclasses.asdict(config), **task.record})
    with torch.no_grad():
        before, after = task.decode(task.original), task.decode(result.sample)
    save_image_grid({"before": before, f"after {config.method}": after}, out / "grid.png")
    save_curves({config.method: result.history}, out / "curves.png", task.description)
    summary = summarize(result.history)
    edit = {}
    if task.inputs is not None:  # image editing: OUT/images/input-, before-, after-<i>.png and the PSNR
        from sdo.app.tasks.edit import save_edit_images

        edit = {**task.record, **save_edit_images(task.inputs, before, after, out / "images")}
        print(f"Reconstruction PSNR of before vs input: {edit['reconstruction_psnr_mean']:.2f} dB")
    save_json(
        {"config": dataclasses.asdict(config), **edit, "summary": summary, "history": result.history},
        out / "metrics.json",
    )
    print(format_table({config.method: summary}))
    print(f"Wrote {out}/latent.safetensors, grid.png, curves.png, metrics.json")
    return 0


def _optimize_items(config) -> int:
    from sdo.app.sharded import run_items

    summary = run_items(config)
    if summary is not None:  # the main process
        print(summary["table"])
        print(f"Wrote {Path(config.out)}/items/<index>/, summary.md, summary.json, grid.png")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sdo.app.bench import BenchConfig, format_rows, run_bench
    from sdo.app.plots import save_bench_plot
    from sdo.io import atomic_path, save_json

    config = _config_from(args, BenchConfig)
    if config.plan:
        return _plan(config)
    result = run_bench(config)
    table = format_rows(result["rows"])
    out = Path(config.out)
    save_json(result, out / "bench.json")
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(f"Machine: {result['machine']}\n\n{table}\n")
    save_bench_plot(result, out / "bench.png")
    if args.json:
        save_json([{k: v for k, v in row.items() if k != "history"} for row in result["rows"]], args.json)
    print(f"Machine: {result['machine']}\n\n{table}")
    print(
        f"\nWrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}"
        + (f", {args.json}" if args.json else "")
    )
    return 0


def _plan(config) -> int:
    from sdo.app.plan import format_plan, plan_bench
    from sdo.io import save_json

    plan = plan_bench(config)
    save_json(plan, Path(config.out) / "plan.json")
    print(f"Plan (predicted, nothing run): {config.model}, batch {config.batch}, {config.variable}\n")
    print(format_plan(plan))
    print(f"\nWrote {Path(config.out) / 'plan.json'}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from sdo.app.finetuning import FinetuneConfig, finetune

    record = finetune(_config_from(args, FinetuneConfig), break_lock=args.break_lock)
    print(json.dumps(record, indent=2))
    print(f"Wrote {Path(args.out) / 'adapter.safetensors'}, metrics.jsonl, reward_curve.png")
    return 0


def _train_zoo(args: argparse.Namespace) -> int:
    from sdo.zoo.train import ZooTrainingConfig, train_zoo

    config = _config_from(args, ZooTrainingConfig)
    metrics = train_zoo(args.out, config)
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``sdo`` argument parser."""
    from sdo.app.bench import BenchConfig
    from sdo.app.demo import demo_config
    from sdo.app.finetuning import FinetuneConfig
    from sdo.app.tasks.latent import LatentTaskConfig
    from sdo.zoo.train import ZooTrainingConfig

    parser = argparse.ArgumentParser(prog="sdo", description="Shortcut Diffusion Optimization (arXiv 2505.07477).")
    parser.add_argument("--version", action="version", version=f"sdo {__version__} ({DISTRIBUTION})")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="SDO vs full backprop on the embedded model, in one process (offline, "
        "< 60 s on CPU with the defaults; --task and --steps compare on other work)",
    )
    pipeline_only = {"pipeline", "prompt", "reward", "clip_path", "aesthetic_head", "style_image", "height", "width"}
    pipeline_only.update({"pickscore_path", "image", "images", "inversion_guidance"})
    many_items = {"conditions", "prompts", "threads"}
    add_config_flags(
        demo, LatentTaskConfig, dataclasses.asdict(demo_config()), exclude={"method", *pipeline_only, *many_items}
    )
    demo.set_defaults(run=_demo, config=lambda args: demo_config(**_fields_of(args, LatentTaskConfig)))

    optimize = commands.add_parser("optimize", help="optimize latents of the embedded model for a task")
    add_config_flags(optimize, LatentTaskConfig)
    optimize.set_defaults(run=_optimize, config=lambda args: _config_from(args, LatentTaskConfig))

    tune = commands.add_parser("finetune", help="reward fine-tuning (LoRA or full), resumable; works under accelerate")
    add_config_flags(tune, FinetuneConfig)
    tune.set_defaults(run=_finetune, config=lambda args: _config_from(args, FinetuneConfig))

    bench = commands.add_parser("bench", help="compare gradient estimators: time, memory, reward, gradient cosine")
    add_config_flags(bench, BenchConfig)
    bench.add_argument("--json", default="", help="also write the rows (without histories) to this JSON file")
    bench.add_argument(
        "--list-methods", action="store_true", help="print every method name and what it runs, then exit"
    )
    bench.set_defaults(run=_bench, config=lambda args: _config_from(args, BenchConfig))

    train = commands.add_parser(
        "train-zoo", help=f"retrain the embedded model and classifiers (needs {DISTRIBUTION}[train])"
    )
    train.add_argument("--out", default="zoo-weights", help="output folder (default: zoo-weights)")
    add_config_flags(train, ZooTrainingConfig)
    train.set_defaults(run=_train_zoo, config=lambda args: _config_from(args, ZooTrainingConfig))
    for command in (demo, optimize, tune, bench, train):
        command.add_argument(
            "--break-lock",
            action="store_true",
            help="take over the output folder's lock when it was written from another host and no run uses it",
        )
    return parser


def _check_up_front(args: argparse.Namespace):
    """Before any model loads: the settings (the command's config), the seed's range, the device, and that every
    output folder is writable. Returns the config."""
    from sdo.app.runs import check_writable
    from sdo.checks import check_device, check_seed

    config = args.config(args)
    if hasattr(args, "seed"):
        check_seed(args.seed)
    if hasattr(args, "device"):
        check_device(args.device)
    check_writable(args.out)
    if getattr(args, "json", ""):
        check_writable(Path(args.json).parent)
    return config


def _run_locked(args: argparse.Namespace, config) -> int:
    """Run a command holding ``--out``'s lock, its settings recorded in ``config.json`` (fine-tuning locks and
    records inside ``finetune``, shared by all its processes)."""
    from sdo.app.runs import RunLock, check_command, clean_leftovers, write_config

    if args.command == "finetune":
        return args.run(args)
    if int(os.environ.get("RANK", "0")) > 0:  # under `accelerate launch`, the other processes share rank 0's lock
        return args.run(args)
    with RunLock(args.out, args.command, args.break_lock):
        check_command(args.out, args.command)
        clean_leftovers(args.out)
        write_config(args.out, args.command, {**dataclasses.asdict(config), "out": args.out})
        return args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdo`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "list_methods", False):  # a question about the registry: no output folder, no lock
        from sdo.methods import describe_methods

        print(describe_methods())
        return 0
    try:
        return _run_locked(args, _check_up_front(args))
    except SdoError as error:  # bad input, missing weights or extras, corrupt files: one clear line, no traceback
        print(f"sdo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

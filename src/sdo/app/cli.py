"""The ``sdo`` command line: ``sdo demo | optimize | finetune | bench | train-zoo``. Task flags are generated from
config dataclasses."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sdo import __version__
from sdo.app.method_flags import AUTO
from sdo.app.runs import is_vacant, remove_unused_folders, remove_unused_records
from sdo.errors import DISTRIBUTION, ConfigError, MissingWeightsError, SdoError


def add_config_flags(
    parser: argparse.ArgumentParser, config_cls, defaults: dict | None = None, exclude=(), only=None
) -> None:
    """One ``--flag`` per dataclass field (type, default, help, choices and older ``aliases`` taken from the field),
    for the fields in ``only`` (default: all) but those in ``exclude``. The help ends with the default, unless the
    field's own help already says what its default does or the default is empty (``""``, None)."""
    defaults = defaults or {}
    for item in dataclasses.fields(config_cls):
        if item.name in exclude or (only is not None and item.name not in only):
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
                help=_with_default(item.metadata.get("help", ""), "on" if default else "off"),
            )
            continue
        parser.add_argument(
            f"--{item.name.replace('_', '-')}",
            *item.metadata.get("aliases", ()),
            dest=item.name,
            type=item.metadata.get("type", type(default)),
            default=default,
            choices=item.metadata.get("choices"),
            help=_with_default(item.metadata.get("help", ""), default),
        )


def _with_default(help: str, default) -> str:
    """``help`` ending with ``(default: DEFAULT)``; as it is where it already says its default (``(default: ...``)
    or the default is empty."""
    if default is None or default == "" or "(default" in help:
        return help
    return f"{help} (default: {default})"


def _fields_of(args: argparse.Namespace, config_cls) -> dict:
    """The parsed flags that are fields of ``config_cls``."""
    names = {item.name for item in dataclasses.fields(config_cls)}
    return {key: value for key, value in vars(args).items() if key in names}


def _config_from(args: argparse.Namespace, config_cls):
    return config_cls(**_fields_of(args, config_cls))


def _demo(args: argparse.Namespace, record_config: Callable[[], None]) -> int:
    from sdo.app.demo import demo_config, format_table, run_demo
    from sdo.app.tasks.latent import LatentTaskConfig

    config = demo_config(**_fields_of(args, LatentTaskConfig))
    print(f"sdo demo: {config.steps} DDIM steps, batch {config.batch}, {config.iters} Adam iterations per method")
    metrics = run_demo(config)
    record_config()
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


def _optimize(args: argparse.Namespace, record_config: Callable[[], None]) -> int:
    from sdo.app.demo import format_table
    from sdo.app.optimization import optimize_and_write
    from sdo.app.tasks.latent import LatentTaskConfig

    config = _config_from(args, LatentTaskConfig)
    if config.conditions or config.prompts:
        return _optimize_items(config, args, record_config)
    built, before_writing = {}, record_config
    if config.method == AUTO:  # plan on the task, choose, say so, and record the choice beside the settings
        from sdo.app.auto import choose_for_optimize

        config, choice, built = choose_for_optimize(config)
        print(choice.line())
        before_writing = functools.partial(record_config, {"auto": choice.record()})
    record = optimize_and_write(config, config.out, on_task=_announce(config), before_writing=before_writing, **built)
    if "reconstruction_psnr_mean" in record:
        print(f"Reconstruction PSNR of before vs input: {record['reconstruction_psnr_mean']:.2f} dB")
    print(format_table({config.method: record["summary"]}))
    latent = "latent.safetensors, " if "latent.safetensors" in record["files"] else ""
    inputs = "images/input-<i>.png, " if "images/input-0.png" in record["images"] else ""  # an edit's inputs
    print(
        f"Wrote {Path(config.out)}/{latent}{inputs}images/before-<i>.png, images/after-<i>.png, grid.png, "
        "curves.png, metrics.json"
    )
    return 0


def _announce(config) -> Callable:
    """What a single ``sdo optimize`` run prints once its task is built: the task and its notes."""

    def announce(task) -> None:
        print(f"Task: {task.description} ({config.method}, {config.steps} steps)")
        for note in task.notes.get("notes", []):
            print(f"Note: {note}")

    return announce


def _optimize_items(config, args: argparse.Namespace, record_config: Callable[[], None]) -> int:
    from sdo.app.sharded import run_items

    summary = run_items(config, verify=args.verify, on_start=record_config)
    if summary is not None:  # the main process
        print(summary["table"])
        print(f"Wrote {Path(config.out)}/items/<index>/, summary.md, summary.json, grid.png")
    return 0


def _bench(args: argparse.Namespace, record_config: Callable[[], None]) -> int:
    from sdo.app.bench import BenchConfig, format_rows, run_bench
    from sdo.app.plots import save_bench_plot
    from sdo.io import atomic_path, save_json

    config = _config_from(args, BenchConfig)
    if config.plan:
        return _plan(config, record_config)
    result = run_bench(config)
    record_config()
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


def _plan(config, record_config: Callable[[], None]) -> int:
    from sdo.app.plan import format_plan, plan_bench
    from sdo.io import save_json

    plan = plan_bench(config)
    record_config()
    save_json(plan, Path(config.out) / "plan.json")
    print(f"Plan (predicted, nothing run): {config.model}, batch {config.batch}, {config.variable}\n")
    print(format_plan(plan))
    print(f"\nWrote {Path(config.out) / 'plan.json'}")
    return 0


def _finetune(args: argparse.Namespace, record_config: Callable[[], None]) -> int:
    """``sdo finetune``: ``finetune`` locks ``--out`` and records ``config.json`` itself (shared by the processes of
    ``accelerate launch``), so ``record_config`` is not called."""
    from sdo.app.finetuning import FinetuneConfig, finetune
    from sdo.app.prompts import read_prompts

    config = _config_from(args, FinetuneConfig)
    if config.pipeline:  # the prompt files are read before the start line, so a missing one is the only line
        read_prompts(config.prompts)
        if config.eval_prompts:
            read_prompts(config.eval_prompts, "--eval-prompts")
    if os.environ.get("RANK", "0") == "0":  # the main process of `accelerate launch` (its group starts later)
        print(_finetune_start(config))
    record = finetune(config, break_lock=args.break_lock)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, the main process reports
        return 0
    print(json.dumps(record, indent=2))
    print(f"Wrote {', '.join(_finetune_outputs(config))}")
    return 0


def _finetune_start(config) -> str:
    """What a fine-tuning run trains, on what, for how long, and where it writes."""
    model = f"pipeline {config.pipeline}" if config.pipeline else "the embedded model"
    weights = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full weights"
    return (
        f"sdo finetune: {model}, {weights}, {config.method} on the {config.reward_spec()} reward, {config.steps} "
        f"update{'s' * (config.steps != 1)} of batch {config.batch_size} ({config.sample_steps} sampling steps); "
        f"writing to {config.out}"
    )


def _finetune_outputs(config) -> list[str]:
    """The files and folders a finished fine-tuning run wrote (or logged to)."""
    from sdo.app.finetuning import TRACKER_RUN

    out = Path(config.out)
    diffusers = ["pytorch_lora_weights.safetensors" if config.lora_rank else "unet/ or transformer/"]
    files = [*(diffusers if config.pipeline else []), "sdo/adapter.safetensors", "metrics.jsonl", "samples/"]
    written = [f"{out}/{files[0]}", *files[1:], "reward_curve.png", "checkpoints/"]
    trackers = config.trackers()
    if "tensorboard" in trackers:
        written.append(f"{out / TRACKER_RUN}/ (TensorBoard logs: tensorboard --logdir {out / TRACKER_RUN})")
    if others := [name for name in trackers if name != "tensorboard"]:
        written.append(f"the {', '.join(others)} run {TRACKER_RUN}")
    if config.save_pipeline:
        written.append(f"the fine-tuned pipeline (--save-pipeline) {config.save_pipeline}")
    return written


def _train_zoo(args: argparse.Namespace, record_config: Callable[[], None]) -> int:
    from sdo.zoo.train import ZooTrainingConfig, train_zoo

    config = _config_from(args, ZooTrainingConfig)
    record_config()
    metrics = train_zoo(args.out, config)
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``sdo`` argument parser."""
    from sdo.app.bench import BenchConfig
    from sdo.app.demo import demo_config
    from sdo.app.finetuning import FinetuneConfig
    from sdo.app.tasks.latent import PIPELINE_FIELDS, LatentTaskConfig
    from sdo.zoo.train import ZooTrainingConfig

    parser = argparse.ArgumentParser(prog="sdo", description="Shortcut Diffusion Optimization (arXiv 2505.07477).")
    parser.add_argument("--version", action="version", version=f"sdo {__version__} ({DISTRIBUTION})")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="SDO vs full backprop on the embedded model, in one process (offline, "
        "< 60 s on CPU with the defaults; --task and --steps compare on other work)",
    )
    many_items = {"conditions", "prompts"}
    excluded = {"method", "checkpoint_kept", "memory_budget", *PIPELINE_FIELDS, *many_items}  # the demo runs full too
    add_config_flags(demo, LatentTaskConfig, dataclasses.asdict(demo_config()), exclude=excluded)
    demo.set_defaults(run=_demo, config=lambda args: demo_config(**_fields_of(args, LatentTaskConfig)))

    optimize = commands.add_parser(
        "optimize", help="optimize the latents of a sampling run for a reward (embedded model, or --pipeline)"
    )
    add_config_flags(optimize, LatentTaskConfig)
    optimize.add_argument(
        "--verify",
        action="store_true",
        help="runs of many items: also check each finished item's files against their recorded SHA-256 and rehash "
        "every input (pipeline, CLIP and PickScore folders, aesthetic head, style image) even where its size and "
        "modification time are unchanged (reads them)",
    )
    optimize.set_defaults(run=_optimize, config=lambda args: _config_from(args, LatentTaskConfig))

    tune = commands.add_parser("finetune", help="reward fine-tuning (LoRA or full), resumable; works under accelerate")
    add_config_flags(tune, FinetuneConfig)
    tune.set_defaults(run=_finetune, config=_threads_and(FinetuneConfig))

    bench = commands.add_parser("bench", help="compare gradient estimators: time, memory, reward, gradient cosine")
    add_config_flags(bench, BenchConfig)
    bench.add_argument("--json", default="", help="also write the rows (without histories) to this JSON file")
    bench.add_argument(
        "--list-methods", action="store_true", help="print every method name and what it runs, then exit"
    )
    bench.set_defaults(run=_bench, config=_threads_and(BenchConfig))

    train = commands.add_parser(
        "train-zoo", help=f"retrain the embedded model and classifiers (needs {DISTRIBUTION}[train])"
    )
    train.add_argument("--out", default="zoo-weights", help="output folder (default: zoo-weights)")
    add_config_flags(train, ZooTrainingConfig)
    train.set_defaults(run=_train_zoo, config=_threads_and(ZooTrainingConfig))
    for command in (tune, bench, train):  # optimize and demo have it from LatentTaskConfig
        add_config_flags(command, LatentTaskConfig, only={"threads"})
    for command in (demo, optimize, tune, bench, train):
        command.add_argument(
            "--break-lock",
            action="store_true",
            help="take over the output folder's lock when it was written from another host and no run uses it",
        )
        command.set_defaults(flags=flag_table(command))
    return parser


def _threads_and(config_cls):
    """The config builder of a command whose ``--threads`` is not a field of its config ``config_cls``: it checks
    ``--threads`` as ``LatentTaskConfig``'s field, then builds the config."""
    from sdo.app.options import check_value
    from sdo.app.tasks.latent import LatentTaskConfig

    def build(args: argparse.Namespace):
        check_value(LatentTaskConfig, "threads", args.threads)
        return _config_from(args, config_cls)

    return build


def flag_table(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each destination of ``parser``'s options (a config field's name) -> its flag: ``start_step`` ->
    ``--start-step``."""
    return {
        action.dest: action.option_strings[0]  # --project, not --no-project
        for action in parser._actions  # argparse keeps a parser's actions here; no public accessor
        if action.option_strings and action.dest != "help"
    }


def in_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each Python name the library quotes in backticks (`` `start_step` ``) that is one of
    ``flags`` written as its flag (``--start-step``), and a flag the message then names twice
    (`` `style_image` (--style-image)``, ``(flag --prompt)``) named once."""

    def flag(match: re.Match) -> str:
        return flags.get(match.group(1), match.group(0))

    text = re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", flag, message)
    for name in set(flags.values()) & set(re.findall(r"--[a-z0-9-]+", text)):
        text = text.replace(f"{name} ({name})", name).replace(f" (flag {name})", "")
    return text


def _check_up_front(args: argparse.Namespace):
    """Before any model loads: the settings (the command's config), the seed's range, the device, that ``--out``
    is apart from every input folder (``sdo.app.runs.check_apart``) and new, empty or sdo's (``check_owned``), and
    that every output folder is writable. Returns the config."""
    from sdo.app.runs import check_apart, check_owned, check_writable, input_folders
    from sdo.checks import check_device, check_seed

    config = args.config(args)
    if hasattr(args, "seed"):
        check_seed(args.seed)
    if hasattr(args, "device"):  # a plan traces on the meta device: the device it plans for need not be here
        check_device(args.device, present=not getattr(args, "plan", False))
    check_apart("--out", args.out, input_folders(config))
    check_owned(args.out)
    check_writable(args.out)
    if getattr(args, "json", ""):
        check_writable(Path(args.json).parent)
    return config


def _torch_threads(count: int) -> contextlib.AbstractContextManager:
    """``--threads N`` (checked with the command's config): torch's threads in this process for the run, restored
    afterwards (every command that runs a model has the flag; a run of many items also sets them per item)."""
    if not count:
        return contextlib.nullcontext()
    from sdo.app.sharded import torch_threads

    return torch_threads(count)


def _run_locked(args: argparse.Namespace, config) -> int:
    """Run a command holding ``--out`` (``sdo.app.runs.open_output``: its lock, its command checked, leftovers
    cleaned). Its settings are recorded in ``config.json`` by the ``record_config`` callable passed to the
    command, which calls it when its checks are done and it starts writing results, so a refused run leaves the
    folder as it was (fine-tuning locks and records inside ``finetune``, shared by all its processes). A run of
    many items first joins ``accelerate launch``'s process group, if any: only its secondary processes share the
    main process's lock."""
    from sdo.app.runs import is_secondary_process, open_output, write_config

    if args.command == "finetune":
        return args.run(args, _records_its_own_config)
    if args.command == "optimize" and (config.conditions or config.prompts):
        from sdo.app.sharded import process_state

        process_state(config.device)
    record = {**dataclasses.asdict(config), "out": args.out}
    with open_output(args.out, args.command, args.break_lock, settings=record):
        secondary = is_secondary_process()

        def record_config(extra: dict | None = None) -> None:
            if not secondary:  # the main process records the run (and what it decided: --method auto's choice)
                write_config(args.out, args.command, {**record, **(extra or {})})

        return args.run(args, record_config)


def _records_its_own_config() -> None:
    """The ``record_config`` of ``sdo finetune``, whose ``finetune`` records ``config.json`` itself."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdo`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "list_methods", False):  # a question about the registry: no output folder, no lock
        from sdo.methods import describe_methods

        print(describe_methods())
        return 0
    created, vacant = _missing_folders(args), is_vacant(args.out)
    try:
        config = _check_up_front(args)
        with _torch_threads(args.threads):
            return _run_locked(args, config)
    except SdoError as error:  # bad input, missing weights or extras, corrupt files: one clear line, no traceback
        _remove_unused(args, created, vacant)
        print(f"sdo {args.command}: error: {_message(error, args.flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C ends a run like SIGTERM: no traceback, the lock released, resumable
        _remove_unused(args, created, vacant)
        print(f"sdo {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except BaseException:  # a bug's traceback: still no empty --out and no record of a run that wrote nothing
        _remove_unused(args, created, vacant)
        raise


def _message(error: SdoError, flags: dict[str, str]) -> str:
    """The line the command prints for ``error``: a bad setting (``ConfigError``) or a model file not given
    (``MissingWeightsError``) names flags where the library names Python fields (``in_flags``); other errors quote
    other things (a package to install, a file's key)."""
    return in_flags(str(error), flags) if isinstance(error, ConfigError | MissingWeightsError) else str(error)


def _missing_folders(args: argparse.Namespace) -> list[Path]:
    """The output folders (and their parents) that do not exist yet, deepest first: what this run would create."""
    folders = [Path(args.out)] + ([Path(args.json).parent] if getattr(args, "json", "") else [])
    return [folder for top in folders for folder in (top, *top.parents) if not folder.exists()]


def _remove_unused(args: argparse.Namespace, created: list[Path], vacant: bool) -> None:
    """After a refused, failed or interrupted run: the folders it made and, in an ``--out`` that was empty before
    (``vacant``), the record it wrote, when nothing else was written (``sdo.app.runs``). A secondary process of
    ``accelerate launch`` leaves this to the main process, whose folder it is."""
    if "torch.distributed" in sys.modules:
        from sdo.app.runs import is_secondary_process

        if is_secondary_process():
            return
    if vacant:
        remove_unused_records(args.out)
    remove_unused_folders(created)


if __name__ == "__main__":
    sys.exit(main())

"""The `selfaugment` command line.

    selfaugment search -f search.yaml [-o DIR] [--workers N] [--metrics-port P]
    selfaugment status DIR|s3://bucket/prefix
    selfaugment pretrain -f pretrain.yaml -o DIR
    selfaugment eval -f eval.yaml -o DIR
    selfaugment policy validate|show|render|import|export ...
    selfaugment study correlation -f study.yaml -o DIR
    selfaugment study compare DIR --model NAME[=RUN_DIR] ...
    selfaugment study pool DIR DIR ... -o DIR
    selfaugment data prepare SOURCE [--store STORE] [--storage-size N]   (shards + index, once)
    selfaugment data show PREPARED_URI
    selfaugment worker run --store URI --task ID       (one task: what the operator's Jobs run)
    selfaugment worker serve --store URI               (tasks named on stdin: the local runner's)
    selfaugment worker pretrain --store URI --prefix P (a standalone Pretrain resource's job)

Every command that takes a config reads YAML or JSON, accepts `--set key.path=value`
overrides, writes the resolved config next to its results, and exits with status 2 and a
message naming the field when the config is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from selfaugment import __version__
from selfaugment.errors import BAD_INPUT_ERRORS, EXIT_BAD_INPUT, SelfAugmentError, error_line
from selfaugment.logs import quiet_client_libraries

log = logging.getLogger("selfaugment")


def _positive(text: str) -> int:
    """argparse type: an integer of at least 1 (an error names the option and the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class UsageError(SelfAugmentError):
    """A user error: printed without a traceback, exit status 2."""


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "-f",
        "--config",
        type=Path,
        required=required,
        help="YAML or JSON config file (search, pretrain: or the whole manifest of the resource)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.epochs=5 (repeatable)",
    )


def _threads_from_env() -> None:
    threads = os.environ.get("SELFAUGMENT_THREADS")
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def cmd_search(args: argparse.Namespace) -> int:
    from selfaugment.trainer.config import load_config, run_name
    from selfaugment.trainer.search.cli import run_search
    from selfaugment.trainer.spec import AugmentSearchSpec

    spec = load_config(AugmentSearchSpec, args.config, args.overrides, kind="AugmentSearch")
    return run_search(
        spec,
        output=args.output,
        workers=args.workers,
        metrics_port=args.metrics_port,
        progress=not args.no_progress,
        config_name=run_name(args.config, "search"),
        reuse_from=args.reuse_from,
        reuse_workers=not args.fresh_workers,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from selfaugment.trainer.search.cli import print_status

    return print_status(args.run, as_json=args.json, endpoint=args.endpoint)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from selfaugment.trainer.evaluation.pretrained import run_pretrain
    from selfaugment.trainer.moco.pretrain import epoch_logger
    from selfaugment.trainer.pretrain_spec import load_pretrain_config

    _threads_from_env()
    config = load_pretrain_config(args.config, args.overrides)
    on_epoch = None
    if config.runtime.progress:
        on_epoch = epoch_logger(config.optim.epochs, lambda line: print(line, file=sys.stderr))
    result = run_pretrain(config, args.output, progress_callback=on_epoch)
    print(json.dumps(_headline(result), indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from selfaugment.trainer.config import EvalConfig, load_config
    from selfaugment.trainer.evaluation.probes import run_eval

    _threads_from_env()
    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.append(f"checkpoint={args.checkpoint}")
    config = load_config(EvalConfig, args.config, overrides)
    result = run_eval(config, args.output)
    print(json.dumps(_headline(result), indent=2))
    return 0


def _headline(result: dict) -> dict:
    """The scalar figures of a result, for the terminal."""
    return {key: value for key, value in result.items() if isinstance(value, (int, float, str))}


def cmd_policy(args: argparse.Namespace) -> int:
    from selfaugment.trainer.policy.cli import policy_command

    return policy_command(args)


def cmd_worker(args: argparse.Namespace) -> int:
    from selfaugment.trainer.search.pretrain_job import run_pretrain_job
    from selfaugment.trainer.search.tasks import run_task
    from selfaugment.trainer.store import open_store

    _threads_from_env()
    store = open_store(args.store, endpoint=args.endpoint)
    if args.worker_command == "run":
        run_task(store, args.task)
    elif args.worker_command == "serve":
        from selfaugment.trainer.search.serve import serve_stdio

        return serve_stdio(store)
    else:
        run_pretrain_job(store, args.prefix)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from selfaugment.trainer.data.cli import data_command

    _threads_from_env()
    return data_command(args)


def cmd_study(args: argparse.Namespace) -> int:
    from selfaugment.trainer.evaluation.study import run_compare, run_correlation_study, run_pool

    if args.study_command == "compare":
        return run_compare(args.study, args.model, args.output, args.against)
    if args.study_command == "pool":
        return run_pool(args.studies, args.output)
    return run_correlation_study(args.config, args.output, args.overrides, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfaugment",
        description="Label-free augmentation-policy search for self-supervised learning.",
    )
    parser.add_argument("--version", action="version", version=f"selfaugment {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = commands.add_parser("search", help="run the SelfAugment search (resumes if rerun)")
    _add_config_arguments(search)
    search.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="RUN",
        help="where the run is stored: a directory (default runs/<config>) or s3://bucket/prefix",
    )
    search.add_argument("--workers", type=int, default=None, help="concurrent worker processes")
    search.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics")
    search.add_argument("--no-progress", action="store_true", help="no progress bars")
    search.add_argument(
        "--fresh-workers",
        action="store_true",
        help="start a new worker process for every task (default: workers run task after task)",
    )
    search.add_argument(
        "--reuse-from",
        default=None,
        metavar="RUN",
        help="copy finished base and fold tasks from another run with the same training settings",
    )
    search.set_defaults(handler=cmd_search)

    status = commands.add_parser("status", help="summarise a run directory or S3 prefix")
    status.add_argument("run", help="run directory or s3://bucket/prefix")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--endpoint", default=None, help="S3 endpoint URL")
    status.set_defaults(handler=cmd_status)

    pretrain = commands.add_parser("pretrain", help="train MoCo v2 with a policy")
    _add_config_arguments(pretrain, required=False)
    pretrain.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    pretrain.set_defaults(handler=cmd_pretrain)

    evaluate = commands.add_parser("eval", help="rotation / linear / jigsaw evaluation")
    _add_config_arguments(evaluate, required=False)
    evaluate.add_argument("--checkpoint", default=None, help="checkpoint (overrides the config)")
    evaluate.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    evaluate.set_defaults(handler=cmd_eval)

    policy = commands.add_parser("policy", help="validate, show, render, import or export a policy")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    validate = policy_commands.add_parser("validate", help="check policy files")
    validate.add_argument("files", nargs="+", type=Path)
    show = policy_commands.add_parser("show", help="print a policy and its strength per op")
    show.add_argument("policy", help="policy file or built-in name")
    render = policy_commands.add_parser("render", help="PNG grid of augmented samples")
    render.add_argument("policy", help="policy file or built-in name")
    render.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    render.add_argument("--dataset", default="sklearn:digits", help="dataset uri for samples")
    render.add_argument("--images", type=_positive, default=8, help="rows (source images)")
    render.add_argument("--samples", type=_positive, default=8, help="augmented samples per image")
    render.add_argument("--image-size", type=int, default=32, help="image side")
    render.add_argument("--seed", type=int, default=0)
    imported = policy_commands.add_parser(
        "import", help="read a Fast AutoAugment policy list [[name, p, level], ...] exactly"
    )
    imported.add_argument("file", type=Path, help="JSON or YAML list of sub-policies")
    imported.add_argument("-o", "--output", type=Path, help="policy JSON to write (default: print)")
    imported.add_argument("--name", default=None, help="policy name (default: the file's stem)")
    imported.add_argument(
        "--image-size", type=_positive, default=None, help="image side, for ops given in pixels"
    )
    exported = policy_commands.add_parser(
        "export", help="write a policy as a Fast AutoAugment list, refusing what FAA cannot express"
    )
    exported.add_argument("policy", help="policy file or built-in name")
    exported.add_argument("-o", "--output", type=Path, help="file to write (default: print)")
    exported.add_argument(
        "--format", choices=("json", "yaml"), default=None, help="default: from -o, else json"
    )
    policy.set_defaults(handler=cmd_policy)

    study = commands.add_parser("study", help="studies of the paper's claims")
    study_commands = study.add_subparsers(dest="study_command", required=True)
    correlation = study_commands.add_parser(
        "correlation", help="rotation vs supervised linear accuracy over many policies"
    )
    _add_config_arguments(correlation)
    correlation.add_argument("-o", "--output", type=Path, required=True)
    correlation.add_argument("--workers", type=int, default=1)
    compare = study_commands.add_parser(
        "compare", help="table of policies at equal budget: study models, search runs beside"
    )
    compare.add_argument("study", type=Path, help="output folder of `study correlation`")
    compare.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME[=RUN_DIR]",
        help="a study model, with the search run that found its policy (repeatable)",
    )
    compare.add_argument("-o", "--output", type=Path, help="JSON file to write the table to")
    compare.add_argument(
        "--against",
        metavar="NAME",
        help="add each model's linear accuracy minus this model's, seed by seed (paired)",
    )
    pool = study_commands.add_parser(
        "pool", help="pool correlation studies that differ only in the seed (noise, mean rho)"
    )
    pool.add_argument("studies", type=Path, nargs="+", help="output folders of `study correlation`")
    pool.add_argument("-o", "--output", type=Path, required=True, help="folder to write to")
    study.set_defaults(handler=cmd_study)

    data = commands.add_parser("data", help="prepare a dataset into shards once; show one")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_prepare = data_commands.add_parser(
        "prepare", help="store a source as shards with an index (reused, and resumed, if rerun)"
    )
    data_prepare.add_argument(
        "source", help="image folder, .npz/IDX, s3:// prefix, torchvision:NAME"
    )
    data_prepare.add_argument(
        "--store", default=None, help="where prepared datasets live (default: the cache folder)"
    )
    data_prepare.add_argument(
        "--storage-size", type=_positive, default=256, help="stored side (px)"
    )
    data_prepare.add_argument("--shard-size", type=_positive, default=1024, help="images per shard")
    data_prepare.add_argument("--encoding", choices=("jpeg", "png"), default="jpeg")
    data_prepare.add_argument("--jpeg-quality", type=_positive, default=95)
    data_prepare.add_argument("--format", default="auto", help="source format (default: inferred)")
    data_prepare.add_argument("--split", choices=("train", "test"), default="train")
    data_prepare.add_argument("--root", default=None, help="folder of torchvision datasets")
    data_prepare.add_argument("--download", action="store_true", help="let torchvision download")
    data_prepare.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip")
    data_prepare.add_argument("--workers", type=_positive, default=None, help="decoding threads")
    data_show = data_commands.add_parser("show", help="summarise a prepared dataset")
    data_show.add_argument("prepared", help="its URI, as `data prepare` prints it")
    for sub in (data_prepare, data_show):
        sub.add_argument("--endpoint", default=None, help="S3 endpoint URL")
        sub.add_argument("--json", action="store_true", help="print JSON")
    data.set_defaults(handler=cmd_data)

    worker = commands.add_parser("worker", help="run tasks (used by runners and Jobs)")
    worker_commands = worker.add_subparsers(dest="worker_command", required=True)
    run = worker_commands.add_parser("run", help="run one task of a search")
    run.add_argument("--store", required=True, help="run directory or s3://bucket/prefix")
    run.add_argument("--task", required=True, help="task id, e.g. fold-0")
    run.add_argument("--endpoint", default=None, help="S3 endpoint URL")
    serve = worker_commands.add_parser(
        "serve", help="run the tasks named on stdin, one at a time (the local runner's workers)"
    )
    serve.add_argument("--store", required=True, help="run directory or s3://bucket/prefix")
    serve.add_argument("--endpoint", default=None, help="S3 endpoint URL")
    job = worker_commands.add_parser("pretrain", help="run a standalone Pretrain job")
    job.add_argument("--store", required=True, help="directory or s3://bucket/prefix")
    job.add_argument("--prefix", required=True, help="key prefix holding config.json")
    job.add_argument("--endpoint", default=None, help="S3 endpoint URL")
    worker.set_defaults(handler=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_client_libraries()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BAD_INPUT_ERRORS as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

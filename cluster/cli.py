"""`flm cluster train PLAN.yaml`: the growth plan on a Ray cluster, one Ray Train run per stage; `flm cluster data
prepare SOURCE`: `flm data prepare` with Ray Data (cluster/data.py); `flm tune SEARCH.yaml`: the μP proxy search with
Ray Tune (cluster/tune.py).

Wired into `flm` by `flm/cli.py` through `add_cluster_cli(subparsers)`; user errors raise FLMConfigError, which the
`flm` command prints as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os

from flm.cli import console
from flm.config import FLMConfigError, flm_home, load_plan
from flm.connect import connect


def workers(run) -> str:
    """'2', or '2 of (1, 4)' for an elastic stage."""
    if isinstance(run.workers, int) or run.world_size is None:
        return str(run.world_size or run.workers)
    return f"{run.world_size} of {tuple(run.workers)}"


def cmd_cluster_train(args: argparse.Namespace) -> None:
    from rich.table import Table

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from cluster.train import StageRun, check_plan, check_storage, run_plan, stage_end
    from flm.storage import join

    # everything that can be wrong with the input fails here, before a cluster starts
    plan = load_plan(args.plan)
    storage = check_storage(args.storage or flm_home() / "runs")
    check_plan(plan, args.backend, str(storage))
    if args.max_failures < -1:
        raise FLMConfigError(f"--max-failures: {args.max_failures}; use -1 (retry forever) or a count >= 0")

    name = args.name or plan.name
    finished = all(stage_end(join(storage, name), k) for k in range(len(plan.stages)))
    started = not finished and connect(ray, args.address)  # a finished run needs no cluster

    def show(run: StageRun) -> None:
        if not args.json:
            s = run.summary or {}
            loss = f", loss {s['loss']:.4f}" if "loss" in s else ""
            console().print(f"stage {run.stage}: {run.status} ({run.backend or '-'}, {workers(run)} workers, "
                          f"{run.seconds:.1f} s{loss}) -> {run.checkpoint}", soft_wrap=True)

    try:
        runs = run_plan(plan, storage, name, backend=args.backend, max_failures=args.max_failures,
                        check_cluster=not (args.no_resource_check or finished), on_stage=show)
    finally:
        if started:
            ray.shutdown()
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2))
        return
    table = Table(title=f"{name}: {join(storage, name)}")
    for col in ("stage", "status", "backend", "workers", "params", "steps", "loss", "val loss", "seconds"):
        table.add_column(col, justify="right")
    for r in runs:
        s = r.summary or {}
        table.add_row(str(r.stage), r.status, r.backend or "-", workers(r),
                      f"{s['params'] / 1e6:.2f}M" if "params" in s else "", str(s.get("steps", "")),
                      f"{s['loss']:.4f}" if "loss" in s else "", f"{s['val_loss']:.4f}" if "val_loss" in s else "",
                      f"{r.seconds:.1f}")
    console().print(table)


def cmd_tune(args: argparse.Namespace) -> None:
    from rich.table import Table

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from cluster.tune import Trial, load_search, prepare, run_search, summarize

    search = load_search(args.search)  # every input error fails here or in prepare(), before a cluster starts
    if args.out:
        search = search.model_copy(update={"out": args.out})
    search = prepare(search)
    import ray

    started = connect(ray, args.address)
    total = search.samples if search.search == "random" else search.grid.size * search.samples
    done = []

    def show(t: Trial) -> None:
        done.append(t)
        if not args.json:
            console().print(f"trial {len(done)}/{total}: lr {t.lr:g} init_std {t.init_std:g} output_mult "
                          f"{t.output_mult:g} seed {t.seed}: {t.status}, val_loss {t.val_loss:.4f} "
                          f"(step {t.step})", soft_wrap=True)

    try:
        result = run_search(search, on_trial=show)
    finally:
        if started:
            ray.shutdown()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return
    table = Table(title=f"{search.name}: {search.search} search at width {search.search_width}, "
                        f"{search.steps} steps per trial")
    for col in ("lr", "init_std", "output_mult", "seeds", "final val loss", "status"):
        table.add_column(col, justify="right")
    best = (result.best.lr, result.best.init_std, result.best.output_mult)
    for r in sorted(summarize(result.trials), key=lambda r: r["val_loss"]):
        table.add_row(f"{r['lr']:g}", f"{r['init_std']:g}", f"{r['output_mult']:g}", str(r["seeds"]),
                      f"{r['val_loss']:.4f}", r["status"],
                      style="bold green" if (r["lr"], r["init_std"], r["output_mult"]) == best else None)
    console().print(table)
    out = result.out_dir
    console().print(f"best: lr {result.best.lr:g}, init_std {result.best.init_std:g}, output_mult "
                  f"{result.best.output_mult:g} (val loss {result.best.val_loss:.4f}); wrote {out / 'best.yaml'}, "
                  f"{out / 'results.json'}, {out / 'heatmap.png'}", soft_wrap=True)


def cmd_cluster_data_prepare(args: argparse.Namespace) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from cluster.data import prepare_dataset_ray
    from flm.cli import prepare_options, prepare_summary

    options = prepare_options(args)
    started = connect(ray, args.address)
    try:
        m = prepare_dataset_ray(args.source, args.out, **options)
    finally:
        if started:
            ray.shutdown()
    print(prepare_summary(args.out, m))


def add_cluster_cli(subparsers) -> None:
    """Register `cluster train`, `cluster data prepare` and `tune` on the `flm` command's subparsers."""
    p = subparsers.add_parser("cluster", help="run on a Ray cluster (Ray Train)")
    sub = p.add_subparsers(dest="cluster_command", required=True)
    t = sub.add_parser("train", help="train a growth plan with Ray Train, one run per stage (resumes where it "
                                     "stopped: relaunch with the same --name)")
    t.add_argument("plan", help="growth plan YAML; each stage's layout gives its workers, GPUs and CPUs")
    t.add_argument("--address", help="Ray cluster to join ('auto', host:6379, ray://host:10001); "
                                     "default: start a local one")
    t.add_argument("--storage", help="directory or object store URI (s3://bucket/prefix) holding the run and Ray's "
                                     "records; on several nodes a shared mount or a URI (default: $FLM_HOME/runs)")
    t.add_argument("--name", help="run name (default: the plan's name): the run directory is STORAGE/NAME")
    t.add_argument("--backend", help="gradient backend for every stage, overriding the plan: ddp (torch DDP) or "
                                     "zero1, zero2, zero3 (DeepSpeed ZeRO stage 1/2/3)")
    t.add_argument("--max-failures", type=int, default=3,
                   help="worker-group restarts allowed per stage (-1: unlimited; default 3)")
    t.add_argument("--no-resource-check", action="store_true",
                   help="start even if the cluster has fewer CPUs/GPUs now than a stage needs (autoscaling)")
    t.add_argument("--json", action="store_true", help="print the stage results as JSON")
    t.set_defaults(func=cmd_cluster_train)

    from flm.cli import add_prepare_arguments

    d = sub.add_parser("data", help="token datasets with Ray Data")
    dsub = d.add_subparsers(dest="cluster_data_command", required=True)
    prep = dsub.add_parser("prepare", help="`flm data prepare` with Ray Data reading (local paths or s3://) and "
                                           "tokenizing across the cluster; the same output byte for byte")
    add_prepare_arguments(prep)
    prep.add_argument("--address", help="Ray cluster to join ('auto', host:6379, ray://host:10001); default: start "
                                        "a local one. On several nodes --out's parent must be a shared mount")
    prep.set_defaults(func=cmd_cluster_data_prepare)

    p = subparsers.add_parser("tune", help="μP proxy hyperparameter search with Ray Tune (lr x init_std x "
                                           "output_mult) -> best.yaml for a plan's hparams_from")
    p.add_argument("search", help="search YAML, e.g. configs/search.yaml")
    p.add_argument("--address", help="Ray cluster to join ('auto', host:6379, ray://host:10001); default: start "
                                     "a local one")
    p.add_argument("--out", help="results directory (default: the search's out or $FLM_HOME/tune/<name>)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_tune)

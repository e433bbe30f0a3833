"""`flm`: the command line. Every user error exits with code 2 and one line that names what to change.

flm's own commands live here; the layers above add theirs through the `flm.cli` entry point (cluster/cli.py,
service/cli.py, api/cli.py). Every command imports what is heavy (torch, rich, the data and model code) inside
itself, so `flm --help` and the REST client's commands start in about a third of a second (benchmarks/startup.py);
tests/test_imports.py checks that starting imports no torch, Ray or FastAPI."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

from flm.config import (
    FLMConfigError,
    GrowthPlan,
    ModelConfig,
    ProxyFamily,
    SearchedHparams,
    flm_home,
    load_plan,
    load_yaml,
    parse,
)
from flm.flops import param_count

# The extra of pyproject.toml that brings each optional top-level module: a command whose import of one fails exits 2
# naming the extra to install, not with a traceback (`pip install 'flm[client]'` has no torch or Ray). torch, Ray and
# the tokenizers are in both train and serve: the command's package picks (service/ and api/ serve models).
EXTRAS = {
    **dict.fromkeys(("deepspeed", "datasets", "huggingface_hub", "pyarrow", "scipy", "matplotlib"), "train"),
    **dict.fromkeys(("torch", "ray", "safetensors", "numpy", "tokenizers", "tiktoken"), "train/serve"),
    **dict.fromkeys(("fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy", "alembic"), "serve"),
    "rich": "client", "psycopg": "cloud", "boto3": "cloud", "transformers": "hf", "lm_eval": "eval", "tqdm": "eval",
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
}


def missing_extra(error: ModuleNotFoundError, command) -> str | None:
    """The extra that would bring the module `error` says is missing, for the command function `command`; None
    when the module is none of ours to name (then the error is a bug and keeps its traceback)."""
    extra = EXTRAS.get((error.name or "").split(".")[0])
    if extra == "train/serve":
        return "serve" if command.__module__.split(".")[0] in ("service", "api") else "train"
    return extra


@functools.cache
def console():
    """The rich console every command prints to, at least 120 columns wide (tables stay whole); made at first use,
    so `flm --help` does not import rich."""
    from rich.console import Console

    return Console(width=max(120, shutil.get_terminal_size().columns))


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def cmd_plan(args) -> None:
    from rich.table import Table

    from flm.plan import Hardware, plan_cost

    plan = load_plan(args.plan)
    hw = parse(Hardware, {k: v for k, v in dict(gpus=args.gpus, tflops_per_gpu=args.tflops_per_gpu, mfu=args.mfu,
                                                  peak_tflops=args.peak_tflops,
                                                  price_per_gpu_hour=args.price).items() if v is not None},
               "hardware")
    try:
        cost = plan_cost(plan, hw)
    except ValueError as e:
        raise FLMConfigError(str(e)) from None
    from flm.memory import GIB, plan_memory

    if args.gpu_mem <= 0:
        raise FLMConfigError(f"--gpu-mem: {args.gpu_mem} must be > 0 (GiB per GPU)")
    memory = plan_memory(plan, int(args.gpu_mem * GIB), dry_run=args.dry_run)
    from flm.memory import serve_memory

    if args.serve_tp < 1:
        raise FLMConfigError(f"--serve-tp: {args.serve_tp} must be >= 1")
    final = plan.model_configs()[-1]
    serving = serve_memory(final, args.serve_tp, int(args.gpu_mem * GIB))
    if args.json:
        print(json.dumps({**cost.model_dump(), "memory": [m.model_dump() for m in memory],
                          "serving": serving.model_dump()}, indent=2))
        return
    table = Table(title=f"plan {plan.name}: growth vs training the final size from scratch")
    for col in ("stage", "params", "tokens", "FLOPs", "GPUs", "TFLOP/s/GPU", "days", "GPU-days", "$"):
        table.add_column(col, justify="right")
    for s in cost.stages:
        table.add_row(s.name, f"{s.params / 1e9:.2f}B", f"{s.tokens / 1e9:.2f}B", f"{s.flops:.3e}", str(s.gpus),
                      f"{s.tflops_per_gpu:.0f}", f"{s.days:.2f}", f"{s.gpu_days:.0f}", f"{s.dollars:,.0f}")
    table.add_row("growth total", "", f"{cost.total_tokens / 1e9:.2f}B", f"{cost.total_flops:.3e}", "", "",
                  f"{cost.total_days:.2f}", "", f"{cost.total_dollars:,.0f}", style="bold")
    last = cost.stages[-1]
    table.add_row("from scratch", f"{last.params / 1e9:.2f}B", f"{cost.total_tokens / 1e9:.2f}B",
                  f"{cost.scratch_flops:.3e}", str(last.gpus), f"{last.tflops_per_gpu:.0f}",
                  f"{cost.scratch_days:.2f}", "", f"{cost.scratch_dollars:,.0f}")
    console().print(table)
    console().print(f"time saved by growth: [bold]{cost.time_saving:.1%}[/bold] ({cost.speedup:.2f}x faster)")
    title = f"memory per GPU (GiB) under backend fsdp, against {args.gpu_mem:g} GiB" + \
        (": sharded states measured by the dry run" if args.dry_run else "")
    table = Table(title=title)
    cols = ["stage", "layout", "micro x seq", "params", "grads", "AdamW", "gathered", "activations", "act. no AC",
            "act. full AC", "total", "fits"]
    if args.dry_run:
        cols[-1:-1] = ["measured states", "error"]
    for col in cols:
        table.add_column(col, justify="right")
    for m in memory:
        row = [m.name, f"tp {m.tp} x dp {m.dp}", f"{m.micro_batch} x {m.seq_len}",
               *(f"{v / GIB:.2f}" for v in (m.params, m.grads, m.optimizer, m.gathered, m.activations,
                                             m.activations_without_ac, m.activations_with_ac, m.total))]
        if args.dry_run:
            row += [f"{m.measured_states / GIB:.2f}", f"{m.states_error:.2%}"]
        table.add_row(*row, "yes" if m.fits else "[bold red]NO[/bold red]")
    console().print(table)
    console().print(f"serving the final model ({param_count(final) / 1e9:.2f}B) at TP {serving.tp}, bf16, on "
                  f"{args.gpu_mem:g} GiB GPUs: {serving.weight_bytes / GIB:.2f} GiB of weights per rank, "
                  f"{serving.kv_bytes_per_token / 2**20:.2f} MiB of KV cache per token, "
                  f"{serving.kv_tokens:,} KV tokens fit beside them (10% kept free)"
                  + ("" if serving.fits else " [bold red]: the weights do not fit[/bold red]"))


def cmd_check(args) -> None:
    """Validate a YAML file as a growth plan or a proxy family."""
    data = load_yaml(args.file)
    kind = ProxyFamily if "widths" in data else GrowthPlan
    obj = load_plan(args.file) if kind is GrowthPlan else parse(kind, data, args.file)  # load_plan: hparams_from
    console().print(f"{args.file}: valid {kind.__name__}")
    if isinstance(obj, GrowthPlan):
        for k, cfg in enumerate(obj.model_configs()):
            console().print(f"  stage {k}: {cfg.n_layer} layers x {cfg.d_model}, {cfg.n_head} heads, "
                          f"ffn {cfg.d_ffn}, {obj.steps(k)} steps")


def cmd_train(args) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from flm.train import Trainer

    plan = load_plan(args.plan)
    overrides = {k: v for k, v in dict(out=args.out, data=args.data).items() if v is not None}
    if overrides:
        plan = parse(GrowthPlan, {**plan.model_dump(), "train": {**plan.train.model_dump(), **overrides}}, args.plan)
    total = plan.stage_starts()[-1]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console()) as progress:
        task = progress.add_task("preparing", total=total)

        def show(record: dict) -> None:
            if "loss" in record:
                val = f" val {record['val_loss']:.3f}" if "val_loss" in record else ""
                progress.update(task, completed=record["step"],
                                description=f"stage {record['stage']} loss {record['loss']:.3f}{val}")

        trainer = Trainer(plan, on_record=show)
        summaries = trainer.fit(max_steps=args.max_steps)
    table = Table(title=f"{plan.name}: {trainer.run_dir}")
    for col in ("stage", "params", "steps", "tokens", "FLOPs", "loss", "val loss", "seconds"):
        table.add_column(col, justify="right")
    for s in summaries:
        table.add_row(s["name"], f"{s['params'] / 1e6:.2f}M", str(s["steps"]), f"{s['tokens']:,}",
                      f"{s['flops']:.3e}", f"{s['loss']:.4f}", f"{s['val_loss']:.4f}", f"{s['seconds']:.1f}")
    console().print(table)
    if (trainer.run_dir / "tensorboard").is_dir():
        console().print(f"curves: tensorboard --logdir {trainer.run_dir / 'tensorboard'}")


def _data_files(pairs: list[str]) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0]]
    if bad:
        raise FLMConfigError(f"--data-file: expected NAME=PATH (a symbolic-mapping subtask and its JSONL), "
                             f"got {bad[0]!r}")
    return dict(p.split("=", 1) for p in pairs)


def cmd_eval(args) -> None:
    if args.suite == "perplexity":
        from flm.perplexity import checkpoint_perplexity

        result = checkpoint_perplexity(args.model, args.data, args.split, args.stride, args.max_tokens,
                                       args.batch_size, progress=True)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "perplexity.json")
        with open(path, "w") as f:
            f.write(result.model_dump_json(indent=2) + "\n")
        console().print(f"{result.split} perplexity [bold]{result.ppl:.3f}[/bold] (NLL {result.nll:.4f} nats/token) "
                      f"over {result.tokens:,} tokens, {result.windows} windows of {result.seq_len} "
                      f"(stride {result.stride}), {result.seconds:.1f} s; wrote {path}")
        return
    if args.suite != "iq":
        raise FLMConfigError(f"--suite: unknown suite {args.suite!r}; available: iq, perplexity")
    from flm.iq.backends import backend_for
    from flm.iq.suite import print_result, run_suite, save_result

    data_files = _data_files(args.data_file)
    subtasks = args.subtasks.split(",") if "," in args.subtasks else args.subtasks
    backend = backend_for(args.model, os.environ.get("FLM_API_KEY"), args.model_name)
    result = run_suite(backend, subtasks, seed=args.seed, n_items=args.n_items, data_files=data_files)
    print_result(result, console())
    json_path, png_path = save_result(result, args.out)
    console().print(f"wrote {json_path} and {png_path}")


def cmd_lm_eval(args) -> None:
    """lm-eval's own command line, with our checkpoints registered as `--model flm` (see flm/lm_eval_model.py)."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import flm.lm_eval_model  # noqa: F401  (registers "flm")
    except ImportError as e:
        raise FLMConfigError(f"flm lm-eval needs lm-eval: pip install 'flm[eval]' ({e})") from None
    argv, sys.argv = sys.argv, ["lm-eval", *args.args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv


def cmd_export_hf(args) -> None:
    from flm.export import export_hf

    console().print(f"wrote {export_hf(args.checkpoint, args.out)} (GPTNeoXForCausalLM)")


def cmd_mup_check(args) -> None:
    from flm.coord_check import coord_check, logit_growth, plot

    base = ModelConfig(n_layer=args.layers, d_model=args.widths[0], n_head=1, head_dim=args.head_dim,
                       vocab_size=args.vocab, seq_len=args.seq_len)
    if any(w % args.head_dim for w in args.widths):
        raise FLMConfigError(f"--widths: every width must be a multiple of --head-dim {args.head_dim}")
    result = coord_check(base, [int(w) for w in args.widths], args.steps, args.lr)
    path = plot(result, args.out)
    console().print(f"logits scale, widest / narrowest width: μP {logit_growth(result, 'mup'):.2f}x, "
                  f"standard {logit_growth(result, 'sp'):.2f}x; wrote {path} and {path.with_suffix('.json')}")


def cmd_consolidate(args) -> None:
    from flm.checkpoint import CheckpointError, consolidate, verify_checkpoint
    from flm.sharded import is_sharded

    src = Path(args.checkpoint)
    if not is_sharded(src):
        raise FLMConfigError(f"{src}: not a sharded checkpoint (no sharded/ directory)")
    if Path(args.out).resolve() == src.resolve():
        raise FLMConfigError("OUT: must differ from the sharded checkpoint")
    try:
        verify_checkpoint(src)
    except CheckpointError as e:
        raise FLMConfigError(str(e)) from None
    out = consolidate(src, args.out)
    console().print(f"wrote {out} (single-file: model.safetensors, optimizer.pt)")


def prepare_options(args) -> dict:
    """`prepare_dataset`'s keyword arguments from the options `add_prepare_arguments` defines."""
    from flm.data import TokenizerSpec

    return dict(tokenizer=TokenizerSpec(kind=args.tokenizer, vocab_size=args.vocab_size),
                val_fraction=args.val_fraction, seed=args.seed, max_docs=args.max_docs, seq_len=args.seq_len,
                text_field=args.text_field)


def prepare_summary(out: str, m) -> str:
    """The one line `data prepare` (and `cluster data prepare`) prints of a prepared dataset's flm.data.Manifest."""
    train, val = m.splits["train"], m.splits["val"]
    how = "; one document: val is its last lines" if m.split_by == "text" else ""
    return (f"{out}: {train.tokens:,} train tokens ({train.documents} docs), {val.tokens:,} val tokens "
            f"({val.documents} docs); {m.tokenizer.kind} vocab {m.vocab_size}, {m.dtype}{how}")


def cmd_data_prepare(args) -> None:
    from flm.data import prepare_dataset

    m = prepare_dataset(args.source, args.out, num_proc=args.num_proc, **prepare_options(args))
    print(prepare_summary(args.out, m))


def add_prepare_arguments(p) -> None:
    """The options of `flm data prepare`, shared with `flm cluster data prepare` (Ray Data)."""
    p.add_argument("source", help="a .txt/.jsonl/.parquet file or folder, 'shakespeare', or hf:NAME[:CONFIG]")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", choices=["bpe", "cl100k", "gpt2"], default="bpe")
    p.add_argument("--vocab-size", type=int, help="bpe vocabulary size (default: flm.data.DEFAULT_BPE_VOCAB, 2048)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents held out (default 0.05); of its text for a one-document corpus")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of batch order")
    p.add_argument("--max-docs", type=int, help="read at most this many documents (for hf: streams)")
    p.add_argument("--seq-len", type=int, default=1,
                   help="the longest context it will train at: each split must hold one window of seq_len + 1 tokens")
    p.add_argument("--text-field", default="text",
                   help="the column holding each document's text in .jsonl/.parquet files and hf: datasets "
                        "(default text)")


def cmd_predict(args) -> None:
    import yaml
    from rich.table import Table

    from flm.scaling import family_hparams, fit_runs, load_family, plot_prediction, train_widths

    family = load_family(args.family)
    best = parse(SearchedHparams, load_yaml(args.hparams), str(args.hparams)) if args.hparams else None
    hparams = family_hparams(family, best)
    widths = sorted(args.widths or family.widths)
    at = sorted(args.at or [2 * widths[-1]])
    for w in [*widths, *at]:
        if w <= 0 or w % family.model.head_dim:
            raise FLMConfigError(f"widths: {w} is not a positive multiple of head_dim={family.model.head_dim}")
    if len(widths) < 3:
        raise FLMConfigError(f"--widths: the fit needs at least 3 widths, got {widths}")
    if args.tokens is not None:
        family = parse(ProxyFamily, {**family.model_dump(), "tokens": args.tokens}, "--tokens")
    out = Path(args.out or flm_home() / "predict" / Path(args.family).stem)
    console().print(f"training widths {widths} on {family.tokens:,} tokens each: lr {hparams['lr']:g}, init_std "
                  f"{hparams['init_std']:g}, output_mult {hparams['output_mult']:g}")
    runs = train_widths(family, widths, out / "runs", hparams, data=args.data, eval_batches=args.eval_batches,
                        jobs=args.jobs, threads=args.threads,
                        on_done=lambda i, r: console().print(f"  width {widths[i]}: val loss {r['val_loss']:.4f} "
                                                           f"({r['seconds']:.0f} s)"))
    law = fit_runs(runs)
    targets = []
    for w in at:
        n = param_count(family.at_width(w), embeddings=False)
        targets.append({"width": w, "n": n, "params": param_count(family.at_width(w)), "predicted": float(law(n))})
    table = Table(title=f"L(N) = {law.a:.4g}·N^{law.b:.4f} + {law.c:.4f}  (N: non-embedding parameters)")
    for col in ("width", "N", "val loss", "fit"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(str(r["width"]), f"{r['non_embedding_params']:,}", f"{r['val_loss']:.4f}",
                      f"{float(law(r['non_embedding_params'])):.4f}")
    for t in targets:
        table.add_row(str(t["width"]), f"{t['n']:,}", "", f"{t['predicted']:.4f}", style="bold")
    console().print(table)
    (out / "prediction.json").write_text(json.dumps({"family": str(args.family), "hparams": hparams,
                                                     "tokens": family.tokens, "fit": law.model_dump(),
                                                     "runs": runs, "predictions": targets}, indent=2))
    (out / "fit.yaml").write_text(yaml.safe_dump({"fit": law.model_dump(), "predictions": targets}, sort_keys=False))
    title = f"{Path(args.family).name}: {family.model.n_layer} layers, {family.tokens:,} tokens per width"
    png = plot_prediction(runs, law, targets, out / "prediction.png", title)
    console().print(f"wrote {out / 'prediction.json'} and {png}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="cost of a growth plan vs training the final size from scratch")
    p.add_argument("plan", help="growth plan YAML, e.g. configs/flm-101b.yaml")
    p.add_argument("--gpus", type=int, help="GPUs in every stage (default: each stage's layout tp*pp*dp)")
    p.add_argument("--tflops-per-gpu", type=_floats, help="achieved TFLOP/s per GPU: one value or one per stage")
    p.add_argument("--mfu", type=float, help="used when --tflops-per-gpu is not given (default 0.5)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU for --mfu (default 312)")
    p.add_argument("--price", type=float, help="US$ per GPU-hour (default 1.0)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU for the memory plan (default 80: A800)")
    p.add_argument("--serve-tp", type=int, default=8, help="tensor parallelism for the serving estimate (default 8)")
    p.add_argument("--dry-run", action="store_true",
                   help="build each stage on the meta device, shard it with the real FSDP2 x TP code over a fake "
                        "process group of the stage's world size, and report the measured shard bytes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_command", required=True)
    c = csub.add_parser("consolidate", help="a sharded (DCP) checkpoint -> the single-file format, in one process")
    c.add_argument("checkpoint", help="a sharded checkpoint directory (runs/<name>/checkpoints/step_...)")
    c.add_argument("out", help="the single-file checkpoint directory to write")
    c.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("check", help="validate a plan or proxy YAML")
    p.add_argument("file")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("data", help="prepare token datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="tokenize a corpus into train/val shards")
    add_prepare_arguments(p)
    p.add_argument("--num-proc", type=int, default=1,
                   help="tokenizing processes (datasets' map); the output is the same whatever the number")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("predict", help="train a μP proxy family at several widths, fit L(N) = a·N^b + c and "
                                       "predict the loss of wider models")
    p.add_argument("family", help="proxy family YAML (configs/proxy.yaml) or a search YAML with a proxy:")
    p.add_argument("--hparams", help="best.yaml of `flm tune` (default: the family's lr, init_std, output_mult)")
    p.add_argument("--widths", type=_ints, help="comma list of widths to train and fit (default: the family's)")
    p.add_argument("--at", type=_ints, help="comma list of widths to predict (default: 2x the widest fitted)")
    p.add_argument("--tokens", type=int, help="training tokens per width (default: the family's)")
    p.add_argument("--data", default="shakespeare", help="prepared dataset dir or a source to prepare")
    p.add_argument("--eval-batches", type=int, default=16, help="fixed validation batches of 8 sequences")
    p.add_argument("--jobs", type=int, default=1, help="widths trained at once, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", help="output directory (default: $FLM_HOME/predict/<family file name>)")
    p.set_defaults(func=cmd_predict)

    for plugin in entry_points(group="flm.cli"):  # commands of the layers above flm/ (cluster, ...)
        plugin.load()(sub)

    p = sub.add_parser("train", help="train a growth plan on this machine (resumes where it stopped)")
    p.add_argument("plan", help="growth plan YAML, e.g. configs/tiny.yaml")
    p.add_argument("--out", help="run directory (default: the plan's train.out or $FLM_HOME/runs/<name>)")
    p.add_argument("--data", help="prepared dataset dir or a source such as 'shakespeare' or a path")
    p.add_argument("--max-steps", type=int, help="stop at this global step (resume later with the same command)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="the IQ-test suite (a checkpoint, HF model or endpoint) or held-out perplexity")
    p.add_argument("model", help="checkpoint directory, Hugging Face model directory, or http(s)://host/v1 of an "
                                 "endpoint (key: $FLM_API_KEY); perplexity: a checkpoint of ours")
    p.add_argument("--suite", default="iq", help="iq (default) or perplexity")
    p.add_argument("--subtasks", default="offline", help="iq: a suite name (offline, paper, rule, ...) or a,b,c")
    p.add_argument("--n-items", type=int, help="iq: items per subtask (default: the paper's counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-name", default="", help="iq: the endpoint's model name")
    p.add_argument("--data-file", action="append", default=[], metavar="NAME=PATH",
                   help="iq: a local JSONL of {text(s), label} for symbolic-mapping subtask NAME (repeatable)")
    p.add_argument("--data", help="perplexity: prepared dataset dir (default: the one `flm train` uses without --data)")
    p.add_argument("--split", default="val", help="perplexity: split to score (default val)")
    p.add_argument("--stride", type=int, help="perplexity: window stride in tokens (default: the context length)")
    p.add_argument("--max-tokens", type=int, help="perplexity: score only the split's first N tokens")
    p.add_argument("--batch-size", type=int, default=16, help="perplexity: windows per forward pass")
    p.add_argument("--out", default="runs/eval", help="where iq.json + iq.png or perplexity.json go")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval", add_help=False, prefix_chars="+",  # every argument goes to lm-eval unparsed
                       help="lm-evaluation-harness with our checkpoints as --model flm --model_args checkpoint=PATH")
    p.add_argument("args", nargs="*", help="lm-eval's arguments, e.g. --model flm --model_args checkpoint=PATH "
                                           "--tasks arc_easy")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("export-hf", help="export a RoPE checkpoint as a Hugging Face GPTNeoXForCausalLM")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("mup", help="μP diagnostics")
    mup_sub = p.add_subparsers(dest="mup_command", required=True)
    p = mup_sub.add_parser("check", help="coordinate check: activation scale vs width, μP vs standard")
    p.add_argument("--widths", type=lambda t: [int(x) for x in _floats(t)], default=[64, 128, 256, 512])
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", default="runs/mup/coord_check.png")
    p.set_defaults(func=cmd_mup_check)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command: exit 2 with one line for a user error, 1 with the traceback for anything else; either way the
    error also goes to $FLM_ERROR_FILE when it is set (flm/error_file.py: how a job tells the gateway)."""
    from flm.error_file import exit_code_of

    args = build_parser().parse_args(argv)
    def run() -> None:
        try:
            args.func(args)
        except ModuleNotFoundError as e:  # a user error too: the command's extra is not installed
            extra = missing_extra(e, args.func)
            if extra is None:
                raise
            raise FLMConfigError(f"flm {args.command} needs {e.name.split('.')[0]}, which is not installed: "
                                 f"pip install 'flm[{extra}]'") from None

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())

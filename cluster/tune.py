"""Ray Tune searches the μP proxy's hyperparameters, as FLM-101B did before growing: learning rate x init std x output
multiplier (the paper's "output temperature"), each trial a short single-process run of the ordinary training loop on
the proxy model, the best point written as a `best.yaml` that a growth plan includes with `hparams_from:`.

    flm tune configs/search.yaml [--address auto] [--out DIR] [--json]

    OUT/                 (default $FLM_HOME/tune/<name>; replaced by every search)
      best.yaml          the best point: lr, init_std, output_mult, base_width, parametrization (+ its loss)
      results.json       every trial, the best point, the settings
      heatmap.png        final validation loss over lr x init_std, one facet per output_mult
      trials/<point>/    each trial's run directory (metrics.jsonl; checkpoints are dropped)
      ray/               Tune's own records

Search kinds: `grid` runs every point of the grid (`samples` times, each with its own seed); `random` draws
`samples` points from the grid's values; `asha` runs the grid under Tune's ASHA scheduler, which stops the worst
trials at every rung of validation reports. A trial's resources may be CPU fractions: with `cpu: 0.5` two cores
host four trials at once (each trial then runs torch on one thread).

Everything a user can get wrong (an empty grid, a non-positive value, a width that is not a multiple of head_dim, an
unknown search kind, a dataset whose vocabulary does not fit the model) raises FLMConfigError before Ray starts. The
search's spec (`SearchConfig`) is cluster/search_spec.py, importable without torch: the gateway validates with it.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from cluster.search_spec import AXES, SearchConfig
from flm.config import FLMConfigError, SearchedHparams, load_yaml, parse
from flm.data import Manifest
from flm.scaling import proxy_data, train_proxy
from flm.train import resolve_dataset

METRIC = "val_loss"

# objective(point, search, run_dir, report): train or evaluate one point, calling report({"val_loss": ...}) at
# least once (ASHA needs several). `point` holds the AXES and "seed". Tests plug in analytic objectives.
Objective = Callable[[dict, "SearchConfig", Path, Callable[[dict], None]], None]


def load_search(path: str | Path) -> SearchConfig:
    """Parse a search YAML; a `proxy:` given as a path is read relative to the search file."""
    data = load_yaml(path)
    if "proxy" in data:
        data = {**data, "proxy": proxy_data(data["proxy"], Path(path).parent)}
    return parse(SearchConfig, data, str(path))


# --- the trial ---------------------------------------------------------------------------------------------------
def train_point(point: dict, search: SearchConfig, run_dir: Path, report: Callable[[dict], None]) -> None:
    """The default objective: train the proxy at `point`, reporting the validation loss at every evaluation. A run
    whose loss stops being finite reports val_loss = inf and ends."""
    result = train_proxy(search.plan(point, run_dir),
                         on_eval=lambda r: report({METRIC: r["val_loss"], "loss": r["loss"], "step": r["step"]}))
    if result["diverged"]:
        report({METRIC: math.inf, "loss": result["loss"], "step": result["steps"], "diverged": True})


def point_dir(root: Path, point: dict) -> Path:
    return root / f"lr{point['lr']:g}-std{point['init_std']:g}-mult{point['output_mult']:g}-seed{point['seed']}"


def _trainable(objective: Objective, search: SearchConfig, trials_dir: Path):
    """The Tune function trainable of a search (a closure: Tune ships it to the trial actors)."""

    def proxy_trial(config: dict) -> None:
        import torch
        from ray import tune

        torch.set_num_threads(search.resources.threads)
        point = {k: config[k] for k in (*AXES, "seed")}
        objective(point, search, point_dir(trials_dir, point), tune.report)

    return proxy_trial


# --- running a search ------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One finished trial: its point, last reported metrics and how it ended."""

    lr: float
    init_std: float
    output_mult: float
    seed: int
    val_loss: float  # the last reported one (inf: diverged; nan: no report)
    step: int | None
    reports: int
    status: str  # "completed" | "stopped" (by ASHA) | "diverged" | "error"

    def point(self) -> tuple[float, float, float]:
        return self.lr, self.init_std, self.output_mult


@dataclass
class SearchResult:
    search: SearchConfig
    trials: list[Trial]
    best: SearchedHparams
    out_dir: Path

    def to_dict(self) -> dict:
        return {"name": self.search.name, "search": self.search.model_dump(mode="json"),
                "best": self.best.model_dump(mode="json"), "trials": [asdict(t) for t in self.trials],
                "points": summarize(self.trials)}


def prepare(search: SearchConfig) -> SearchConfig:
    """The search with its dataset prepared and pinned (an absolute directory), checked against the model."""
    first = {"lr": search.grid.lr[0], "init_std": search.grid.init_std[0], "output_mult": search.grid.output_mult[0],
             "seed": search.seed}
    data_dir = resolve_dataset(search.plan(first, search.out_dir / "trials" / "check")).absolute()
    vocab = Manifest.load(data_dir).vocab_size
    if vocab > search.proxy.model.vocab_size:
        raise FLMConfigError(f"proxy.model.vocab_size: {search.proxy.model.vocab_size} is smaller than the "
                             f"tokenizer's {vocab} tokens ({data_dir})")
    return search.model_copy(update={"data": str(data_dir)})


def param_space(search: SearchConfig) -> tuple[dict, int]:
    """Tune's param_space and num_samples for the search kind."""
    from ray import tune

    g = search.grid
    if search.search == "random":
        return {**{a: tune.choice(getattr(g, a)) for a in AXES}, "seed": search.seed}, search.samples
    seeds = [search.seed + i for i in range(search.samples)]
    return {**{a: tune.grid_search(getattr(g, a)) for a in AXES}, "seed": tune.grid_search(seeds)}, 1


def run_search(search: SearchConfig, objective: Objective = train_point,
               on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """Run `search` on the connected Ray cluster (flm.connect.connect first) and write best.yaml, results.json and
    heatmap.png into its out directory, replacing an earlier search there. `on_trial(Trial)` follows progress."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    search = prepare(search)
    have = ray.cluster_resources()
    for kind, need in (("CPU", search.resources.cpu), ("GPU", search.resources.gpu)):
        if need > have.get(kind, 0.0):
            raise FLMConfigError(f"resources.{kind.lower()}: a trial needs {need:g} {kind}s but the Ray cluster has "
                                 f"{have.get(kind, 0.0):g}; lower it or add nodes")
    out = search.out_dir.absolute()
    for sub in ("trials", "ray"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    space, num_samples = param_space(search)
    scheduler = None
    if search.search == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=search.reports,
                                  grace_period=search.asha.grace_period, reduction_factor=search.asha.reduction_factor)
    resources = {"cpu": search.resources.cpu, **({"gpu": search.resources.gpu} if search.resources.gpu else {})}
    tuner = tune.Tuner(
        tune.with_resources(_trainable(objective, search, out / "trials"), resources),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=search.max_concurrent, reuse_actors=True,  # torch is imported once per actor
            search_alg=BasicVariantGenerator(random_state=search.seed) if search.search == "random" else None),
        run_config=tune.RunConfig(name="ray", storage_path=str(out), verbose=0,
                                  callbacks=[_progress_callback(on_trial, search.reports)] if on_trial else None),
    )
    grid = tuner.fit()
    trials = [_trial_from(r.config, r.metrics or {}, "error" if r.error else None, search.reports) for r in grid]
    trials.sort(key=lambda t: (t.lr, t.init_std, t.output_mult, t.seed))
    best = best_point(trials, search)
    result = SearchResult(search, trials, best, out)
    write_results(result)
    return result


def _progress_callback(on_trial: Callable[[Trial], None], max_reports: int):
    """A Tune callback handing each finished trial to `on_trial` (defined here: Ray is imported only to run)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self, on_trial):
            self.on_trial = on_trial

        def __getstate__(self):  # Tune pickles its run config; the caller's function (and its console) stays here
            return {"on_trial": None}

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.on_trial:
                self.on_trial(_trial_from(trial.config, trial.last_result or {}, None, max_reports))

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.on_trial:
                self.on_trial(_trial_from(trial.config, trial.last_result or {}, "error", max_reports))

    return Progress(on_trial)


def _trial_from(config: dict, metrics: dict, status: str | None, max_reports: int) -> Trial:
    """A Trial from Tune's config and last result; fewer reports than `max_reports` means ASHA stopped it."""
    loss = float(metrics.get(METRIC, math.nan))
    reports = int(metrics.get("training_iteration", 0))
    if status is None:
        if metrics.get("diverged") or loss == math.inf:
            status = "diverged"
        elif reports < max_reports:
            status = "stopped"
        else:
            status = "completed"
    return Trial(lr=config["lr"], init_std=config["init_std"], output_mult=config["output_mult"],
                 seed=config["seed"], val_loss=loss, step=metrics.get("step"), reports=reports, status=status)


def summarize(trials: list[Trial]) -> list[dict]:
    """One row per point: mean final validation loss over its seeds, and whether every seed completed."""
    points: dict[tuple, list[Trial]] = {}
    for t in trials:
        points.setdefault(t.point(), []).append(t)
    rows = []
    for (lr, std, mult), ts in sorted(points.items()):
        losses = [t.val_loss for t in ts]
        mean = math.inf if any(v == math.inf for v in losses) else sum(losses) / len(losses)
        rows.append({"lr": lr, "init_std": std, "output_mult": mult, "val_loss": mean, "seeds": len(ts),
                     "completed": all(t.status == "completed" for t in ts),
                     "status": ",".join(sorted({t.status for t in ts}))})
    return rows


def best_point(trials: list[Trial], search: SearchConfig) -> SearchedHparams:
    """The point with the lowest mean final validation loss among those whose every trial ran to the end."""
    rows = [r for r in summarize(trials) if r["completed"] and math.isfinite(r["val_loss"])]
    if not rows:
        raise RuntimeError(f"search {search.name}: no trial completed with a finite loss "
                           f"({', '.join(sorted({t.status for t in trials}))}); lower the learning rates")
    best = min(rows, key=lambda r: r["val_loss"])
    cfg = search.proxy.at_width(search.search_width)
    return SearchedHparams(lr=best["lr"], init_std=best["init_std"], output_mult=best["output_mult"],
                           base_width=cfg.base_width, parametrization=cfg.parametrization, val_loss=best["val_loss"],
                           source={"search": search.name, "kind": search.search, "width": search.search_width,
                                   "n_layer": cfg.n_layer, "tokens": search.steps * search.proxy.batch_size
                                   * cfg.seq_len, "trials": len(trials), "seeds": search.samples
                                   if search.search != "random" else 1})


# --- results -----------------------------------------------------------------------------------------------------
def write_results(result: SearchResult) -> None:
    out = result.out_dir
    best = result.best.model_dump(mode="json")
    (out / "best.yaml").write_text(
        f"# best point of the proxy search {result.search.name!r}; include it in a growth plan with\n"
        f"#   hparams_from: {out / 'best.yaml'}\n" + yaml.safe_dump(best, sort_keys=False))
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    plot_heatmap(result, out / "heatmap.png")


def plot_heatmap(result: SearchResult, path: Path) -> Path:
    """Final validation loss over lr (x) x init_std (y), one facet per output_mult; the best point boxed."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    g, rows = result.search.grid, summarize(result.trials)
    by_point = {(r["lr"], r["init_std"], r["output_mult"]): r for r in rows}
    finite = [r["val_loss"] for r in rows if r["completed"] and math.isfinite(r["val_loss"])]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    fig = Figure(figsize=(max(6.0, 2.2 + 0.9 * len(g.lr) * len(g.output_mult)), 2.0 + 0.6 * len(g.init_std)),
                 layout="constrained")
    axes = fig.subplots(1, len(g.output_mult), squeeze=False, sharey=True)[0]
    best = (result.best.lr, result.best.init_std, result.best.output_mult)
    image = None
    for ax, mult in zip(axes, g.output_mult, strict=True):
        grid = np.full((len(g.init_std), len(g.lr)), np.nan)
        for i, std in enumerate(g.init_std):
            for j, lr in enumerate(g.lr):
                r = by_point.get((lr, std, mult))
                if r is None:
                    continue
                if r["completed"] and math.isfinite(r["val_loss"]):
                    grid[i, j] = r["val_loss"]
                text = (f"{r['val_loss']:.3f}" if r["completed"] and math.isfinite(r["val_loss"])
                        else "diverged" if r["val_loss"] == math.inf else r["status"])
                dark = math.isfinite(grid[i, j]) and (grid[i, j] - vmin) > 0.6 * (vmax - vmin)  # viridis_r: high = dark
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
                if (lr, std, mult) == best:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="red"))
        image = ax.imshow(grid, cmap="viridis_r", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        ax.set_xticks(range(len(g.lr)), [f"{v:g}" for v in g.lr], rotation=45)
        ax.set_yticks(range(len(g.init_std)), [f"{v:g}" for v in g.init_std])
        ax.set_xlabel("lr")
        ax.set_title(f"output_mult {mult:g}")
    axes[0].set_ylabel("init_std")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="final validation loss")
    s = result.search
    fig.suptitle(f"{s.name}: {s.search} search, width {s.search_width}, {s.steps} steps per trial\n"
                 f"best (boxed): lr {result.best.lr:g}, init_std {result.best.init_std:g}, "
                 f"output_mult {result.best.output_mult:g}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

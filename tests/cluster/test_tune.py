"""cluster/tune.py on a real local Ray cluster (2 CPUs): a 2x2x2 grid over an analytic objective with a known optimum
returns that optimum; ASHA stops trials but never the best; a real proxy-training trial through `flm tune` reports
exactly the loss of the same run in one process; its best.yaml round-trips into a growth plan via hparams_from;
bad input fails with exit code 2 before Ray starts."""

import json
import math
import os
from dataclasses import replace

import pytest
import ray
import torch
import yaml

from cluster.tune import SearchConfig, Trial, best_point, load_search, param_space, run_search, summarize
from flm.config import FLMConfigError, SearchedHparams, load_plan
from flm.scaling import train_proxy
from tests.conftest import local_ray, release_local_ray

# The micro proxy family: real training on the session's micro dataset (BPE 320) in about a second per trial.
MICRO_PROXY = {
    "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "head_dim": 16, "vocab_size": 320, "seq_len": 32,
              "base_width": 32, "output_mult": 2.0, "init_std": 0.02},
    "widths": [16, 32, 64], "tokens": 4 * 32 * 10, "batch_size": 4, "lr": 1e-2,
}
GRID = {"lr": [1e-3, 4e-3], "init_std": [0.01, 0.04], "output_mult": [1.0, 4.0]}
OPTIMUM = (4e-3, 0.01, 4.0)  # the analytic objective's best grid point: one of each axis' ends, not all "first"


def bowl(lr: float, init_std: float, output_mult: float) -> float:
    """Smooth, minimum at lr 3e-3, init_std 0.012, output_mult 3.5: on GRID, OPTIMUM wins by a clear margin."""
    return 3.0 + math.log(lr / 3e-3) ** 2 + math.log(init_std / 0.012) ** 2 + 0.1 * (output_mult - 3.5) ** 2


def analytic(point, search, run_dir, report):
    """Four reports converging to bowl(point)."""
    final = bowl(point["lr"], point["init_std"], point["output_mult"])
    for t in range(1, 5):
        report({"val_loss": final + 1.0 / t, "step": t})


def grid_points():
    return [(a, b, c) for a in GRID["lr"] for b in GRID["init_std"] for c in GRID["output_mult"]]


def search_config(tmp_path, data, **kw) -> SearchConfig:
    return SearchConfig.model_validate({"name": "t", "proxy": MICRO_PROXY, "grid": GRID, "data": str(data),
                                        "out": str(tmp_path / "out"), "resources": {"cpu": 0.25},
                                        "max_concurrent": 1, **kw})  # one actor, reused: torch imported once


def write_search(path, data, **kw):
    path.write_text(yaml.safe_dump({"name": "t", "proxy": MICRO_PROXY, "grid": GRID, "data": str(data),
                                    "out": str(path.parent / "out"), **kw}))
    return path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    from flm.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# --- bad input: one line, exit 2, and no Ray (these run before the module's cluster fixture starts one) -----------
BAD = [
    ({"grid": {**GRID, "lr": []}}, "grid.lr: empty; give at least one lr value"),
    ({"grid": {**GRID, "lr": [1e-3, -4e-3]}}, "grid.lr: -0.004 is not a positive number"),
    ({"width": 40}, "width: 40 is not a multiple of the proxy's head_dim 16"),
    ({"search": "bayes"}, "search: 'bayes' is not a search kind; use one of grid, random, asha"),
    ({"proxy": "missing-proxy.yaml"}, "missing-proxy.yaml: no such file"),
    ({"proxy": {**MICRO_PROXY, "model": {**MICRO_PROXY["model"], "vocab_size": 256}}},
     "proxy.model.vocab_size: 256 is smaller than the tokenizer's 320 tokens"),
    ({"search": "asha", "eval_every": 10}, "eval_every: 10 leaves ASHA 1 report per trial"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_fails_before_ray_starts(tmp_path, micro_data, capsys, change, message):
    release_local_ray()  # the previous module's cluster, kept for this one's later tests: the CLI must start none
    assert not ray.is_initialized()
    path = write_search(tmp_path / "search.yaml", micro_data, **change)
    rc, out, err = run_cli(["tune", str(path)], capsys)
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_a_search_file_may_name_its_proxy_relative_to_itself(tmp_path, micro_data):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "proxy.yaml").write_text(yaml.safe_dump(MICRO_PROXY))
    search = load_search(write_search(tmp_path / "conf" / "search.yaml", micro_data, proxy="proxy.yaml"))
    assert search.proxy.model.d_model == 32 and search.steps == 10 and search.grid.size == 8


def test_search_kinds_map_to_tune_spaces(tmp_path, micro_data):
    grid = search_config(tmp_path, micro_data, samples=2)
    space, num_samples = param_space(grid)  # every point once per seed
    assert num_samples == 1 and space["seed"] == {"grid_search": [0, 1]}
    assert all(space[a] == {"grid_search": GRID[a]} for a in GRID)
    rand = search_config(tmp_path, micro_data, search="random", samples=5, seed=7)
    space, num_samples = param_space(rand)  # 5 points drawn from the grid's values
    assert num_samples == 5 and space["seed"] == 7
    assert all(space[a].categories == GRID[a] for a in GRID)
    asha = search_config(tmp_path, micro_data, search="asha")
    assert asha.report_every == 2 and asha.reports == 5  # 10 steps: a report every 10 // 4 steps


# --- on a real local Ray cluster ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2) as resources:
        yield resources


def test_grid_returns_the_known_optimum(ray_cluster, tmp_path, micro_data):
    seen = []
    result = run_search(search_config(tmp_path, micro_data), objective=analytic, on_trial=seen.append)
    assert len(result.trials) == 8 and len(seen) == 8
    assert {t.point() for t in result.trials} == set(grid_points())
    assert all(t.status == "completed" and t.reports == 4 for t in result.trials)
    for t in result.trials:  # the last report is the trial's final loss
        assert t.val_loss == pytest.approx(bowl(*t.point()) + 0.25, abs=1e-12)
    best = result.best
    assert (best.lr, best.init_std, best.output_mult) == OPTIMUM
    assert best.val_loss == pytest.approx(bowl(*OPTIMUM) + 0.25, abs=1e-12)
    assert (best.base_width, best.parametrization) == (32, "mup")
    out = tmp_path / "out"
    assert SearchedHparams.model_validate(yaml.safe_load((out / "best.yaml").read_text())) == best
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["trials"]) == 8 and saved["best"]["lr"] == OPTIMUM[0]
    assert (out / "heatmap.png").stat().st_size > 10_000


def test_asha_stops_trials_but_not_the_best(ray_cluster, tmp_path, micro_data):
    # one trial at a time (max_concurrent 1): ASHA sees the grid in a fixed order, what it stops does not depend on
    # timing
    search = search_config(tmp_path, micro_data, search="asha", eval_every=3)  # 10 steps: 4 reports
    assert search.reports == 4
    result = run_search(search, objective=analytic)
    status = {t.point(): t.status for t in result.trials}
    assert status[OPTIMUM] == "completed"
    assert "stopped" in status.values(), status
    assert all(t.reports < 4 for t in result.trials if t.status == "stopped")
    assert (result.best.lr, result.best.init_std, result.best.output_mult) == OPTIMUM


@pytest.fixture(scope="module")
def real_search(ray_cluster, micro_data, tmp_path_factory):
    """`flm tune` on a 1x1x2 grid of real proxy-training trials."""
    from flm.cli import main

    tmp = tmp_path_factory.mktemp("real")
    path = write_search(tmp / "search.yaml", micro_data, grid={"lr": [1e-2], "init_std": [0.02],
                                                                 "output_mult": [1.0, 4.0]})
    assert main(["tune", str(path)]) == 0
    return load_search(path), tmp / "out"


def test_real_trials_report_the_loss_of_the_same_run_in_one_process(real_search, tmp_path):
    search, out = real_search
    trials = json.loads((out / "results.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["completed", "completed"]
    assert [t["step"] for t in trials] == [10, 10]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial (cpu 1): same reduction order
    try:
        for t in trials:
            point = {k: t[k] for k in ("lr", "init_std", "output_mult", "seed")}
            alone = train_proxy(search.plan(point, tmp_path / f"alone{t['output_mult']}"))
            assert t["val_loss"] == pytest.approx(alone["val_loss"], abs=1e-6)
    finally:
        torch.set_num_threads(threads)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["val_loss"] == min(t["val_loss"] for t in trials)
    assert (out / "trials").is_dir() and not any((out / "trials").glob("*/checkpoints"))


def test_best_yaml_round_trips_into_a_growth_plan(real_search, tmp_path, micro_data):
    search, out = real_search
    best = SearchedHparams.model_validate(yaml.safe_load((out / "best.yaml").read_text()))
    model = {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab_size": 320, "seq_len": 32}
    stage = {"tokens": 4 * 32 * 4, "batch_size": 4}
    plans = tmp_path / "plans"
    plans.mkdir()
    plan_yaml = {"name": "p", "hparams_from": os.path.relpath(out / "best.yaml", plans),
                 "stages": [{**stage, "model": model}, {**stage, "grow": {"d_model": 64}, "lr": 5e-3}],
                 "train": {"data": str(micro_data)}}
    (plans / "plan.yaml").write_text(yaml.safe_dump(plan_yaml))
    plan = load_plan(plans / "plan.yaml")  # the relative path resolves against the plan file, not the cwd
    assert plan.hparams_from == str((out / "best.yaml").resolve())
    first, second = plan.model_configs()
    assert (plan.stages[0].lr, first.init_std, first.output_mult, first.base_width) == (
        best.lr, best.init_std, best.output_mult, best.base_width)
    assert plan.stages[1].lr == 5e-3 and second.output_mult == best.output_mult  # the plan's own value wins

    plan_yaml["stages"][0]["model"] = {**model, "output_mult": 9.0}
    (plans / "plan.yaml").write_text(yaml.safe_dump(plan_yaml))
    assert load_plan(plans / "plan.yaml").model_configs()[0].output_mult == 9.0

    plan_yaml["stages"][0]["model"] = {**model, "base_width": 64}
    (plans / "plan.yaml").write_text(yaml.safe_dump(plan_yaml))
    with pytest.raises(FLMConfigError, match="base_width: 64, but .* was searched at base_width 32"):
        load_plan(plans / "plan.yaml")


def test_best_point_skips_diverged_stopped_and_failed_points(tmp_path, micro_data):
    search = search_config(tmp_path, micro_data, samples=2)
    trials = [Trial(*p, seed=s, val_loss=bowl(*p) + s, step=10, reports=1, status="completed")
              for p in grid_points() for s in (0, 1)]
    best = min(grid_points(), key=lambda p: bowl(*p))
    trials = [t if t.point() != best or t.seed else replace(t, val_loss=math.inf, status="diverged") for t in trials]
    rows = {(r["lr"], r["init_std"], r["output_mult"]): r for r in summarize(trials)}
    assert rows[best]["val_loss"] == math.inf and rows[best]["status"] == "completed,diverged"
    runner_up = sorted(grid_points(), key=lambda p: bowl(*p))[1]
    assert rows[runner_up]["val_loss"] == pytest.approx(bowl(*runner_up) + 0.5) and rows[runner_up]["seeds"] == 2
    chosen = best_point(trials, search)
    assert (chosen.lr, chosen.init_std, chosen.output_mult) == runner_up
    stopped = [replace(t, status="stopped") if t.point() == runner_up else t for t in trials]
    third = sorted(grid_points(), key=lambda p: bowl(*p))[2]
    chosen = best_point(stopped, search)
    assert (chosen.lr, chosen.init_std, chosen.output_mult) == third
    with pytest.raises(RuntimeError, match="no trial completed with a finite loss"):
        best_point([replace(t, status="error") for t in trials], search)

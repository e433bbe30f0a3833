"""`flm` CLI: exit code 2 with one line on bad input; the planner reproduces the paper's numbers. Commands run in
this process through `main` (a new Python process costs seconds of imports); `test_real_process_exit_codes` checks
what a shell sees."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flm.cli import main

ROOT = Path(__file__).resolve().parents[2]
PLAN_101B = str(ROOT / "configs" / "flm-101b.yaml")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flm.cli", *args], capture_output=True, text=True, cwd=ROOT)


def write_plan(tmp_path, mutate) -> str:
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    mutate(data)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BAD = {
    "shrink": (lambda d: d["stages"][1]["grow"].update(n_layer=1), "stages.1.n_layer"),
    "heads do not divide": (lambda d: d["stages"][0]["model"].update(n_head=3), "n_head"),
    "head_dim changes": (lambda d: d["stages"][2]["grow"].update(n_head=8), "stages.2.head_dim"),
    "ramp longer than stage": (lambda d: d["stages"][1].update(ramp_steps=10_000), "stages.1.ramp_steps"),
    "unknown key": (lambda d: d["stages"][0]["model"].update(layers=3), "stages.0.model.layers"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_plan_exits_2_with_one_line(tmp_path, capsys, case):
    mutate, field = BAD[case]
    path = write_plan(tmp_path, mutate)
    for command in (["check", path], ["plan", path]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert field in err and len(err.splitlines()) == 1, err


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`flm ARGS` in this process: (exit code, stdout, stderr); argparse's own errors exit 2 as in a shell."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_real_process_exit_codes(tmp_path):
    missing = run_cli("plan", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad_flag = run_cli("plan", PLAN_101B, "--tflops-per-gpu", "fast")
    assert bad_flag.returncode == 2 and "comma-separated" in bad_flag.stderr and "Traceback" not in bad_flag.stderr


def test_a_wrong_count_of_per_stage_values_exits_2(capsys):
    code, _, err = run_main(capsys, "plan", PLAN_101B, "--tflops-per-gpu", "160,165")
    assert code == 2 and "tflops_per_gpu" in err


def test_plan_reproduces_the_paper(capsys):
    code, out, err = run_main(capsys, "plan", PLAN_101B, "--gpus", "192", "--tflops-per-gpu", "162,160,165", "--json")
    assert code == 0, err
    cost = json.loads(out)
    params = [s["params"] for s in cost["stages"]]
    for got, paper in zip(params, (16e9, 51e9, 101e9), strict=True):
        assert abs(got / paper - 1) <= 0.01
    assert abs(params[2] / 101.7e9 - 1) <= 0.001  # tied embeddings, vocab padded to 100,352
    assert abs(cost["total_flops"] / 52.76e21 - 1) <= 0.05
    assert abs(cost["time_saving"] - 0.72) <= 0.02
    assert abs(cost["total_days"] / 21.54 - 1) <= 0.15
    assert abs(cost["scratch_days"] / 76.74 - 1) <= 0.15


def test_plan_table_is_printed(capsys):
    code, out, _ = run_main(capsys, "plan", PLAN_101B, "--gpus", "192", "--tflops-per-gpu", "162,160,165")
    assert code == 0
    assert "from scratch" in out and "time saved by growth: 72.0%" in out


def test_train_command_runs_a_plan_and_resumes(tmp_path, micro_data, capsys):
    from tests.conftest import micro_plan

    plan_path = tmp_path / "micro.yaml"
    plan_path.write_text(yaml.safe_dump(micro_plan(micro_data, tmp_path / "run").model_dump(mode="json")))
    code, _, err = run_main(capsys, "train", str(plan_path), "--max-steps", "20")
    assert code == 0, err
    code, out, err = run_main(capsys, "train", str(plan_path))
    assert code == 0, err
    assert "stage" in out and (tmp_path / "run" / "checkpoints" / "step_00000036").is_dir()


def test_train_command_rejects_bad_input(tmp_path, capsys):
    plan = write_plan(tmp_path, lambda d: d["stages"][0].update(batch_size=0))
    code, _, err = run_main(capsys, "train", plan)
    assert code == 2 and "stages.0.batch_size" in err and len(err.strip().splitlines()) == 1
    tiny = str(ROOT / "configs" / "tiny.yaml")
    code, _, err = run_main(capsys, "train", tiny, "--data", str(tmp_path / "no-such-dir"))
    assert code == 2 and "no-such-dir" in err and len(err.strip().splitlines()) == 1

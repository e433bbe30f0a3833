"""`python -m api.pipeline SPEC.json`: a pipeline job's entrypoint, tune -> train -> eval -> deploy in order.

Each step but deploy runs the `flm` command that does it alone (`flm tune`, `flm cluster train`, `flm eval`), as a
child process whose output goes to the job's log; deploy calls service/'s Python API. The steps' states and
results are written to `pipeline.json` beside the spec after every change (the gateway shows them), and a
resubmitted pipeline skips the steps that succeeded: training resumes from its checkpoints (same run name). A step
that fails ends the pipeline with its exit code (2: a user error) and its error file (flm/error_file.py), naming the
step: each `flm` child writes its own error file, which the pipeline reads.

    jobs/<id>/spec.json       the request, as the gateway validated it (plus id, home, python, serve_url)
    jobs/<id>/pipeline.json   {"steps": [{"name", "state", "seconds", "result"}, ...]}
    jobs/<id>/plan.yaml       the plan trained (with hparams_from: tune/best.yaml after a tune step)
    jobs/<id>/tune/, eval/    the outputs of those steps
    runs/<id>/                the training run directory
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from api.jobs import eval_args, train_args, tune_args, write_json
from api.runs import checkpoints, read_json
from flm.error_file import ERROR_FILE_ENV, ErrorReport, read_error, write_error

STEPS = ("tune", "train", "eval", "deploy")


class StepFailed(RuntimeError):
    """A step failed: `report` says how (its message is this exception's)."""

    def __init__(self, message: str, exit_code: int = 1, kind: str = "StepFailed"):
        super().__init__(message)
        self.report = ErrorReport(exit_code=exit_code, type=kind, message=message)


def run_flm(python: str, *args: str) -> None:
    """`flm ARGS` as a child process writing to the job's log; if it fails, its error file's report (or its exit
    code, if it died before writing one) becomes this step's error."""
    cmd = [python, "-m", "flm.cli", *args]
    print(f"$ {shlex.join(cmd)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        error_file = Path(tmp) / "error.json"
        code = subprocess.run(cmd, env={**os.environ, ERROR_FILE_ENV: str(error_file)}).returncode
        if code != 0:
            report = read_error(error_file)
            if report is None:
                raise StepFailed(f"`flm {args[0]}` exited with code {code}")
            raise StepFailed(report.message, report.exit_code, report.type)


def final_checkpoint(spec: dict) -> Path:
    found = checkpoints(Path(spec["home"]) / "runs" / spec["id"])
    if not found:
        raise StepFailed(f"training left no checkpoint in runs/{spec['id']}")
    return found[-1]


def step_tune(spec: dict, job_dir: Path) -> dict:
    search = job_dir / "search.yaml"
    search.write_text(yaml.safe_dump(spec["tune"], sort_keys=False))
    out = job_dir / "tune"
    run_flm(spec["python"], *tune_args(search, out))
    best = out / "best.yaml"
    if not best.is_file():
        raise StepFailed(f"flm tune wrote no {best}")
    return {"best": yaml.safe_load(best.read_text()), "path": str(best)}


def step_train(spec: dict, job_dir: Path, results: dict) -> dict:
    plan = dict(spec["plan"])
    if "tune" in results:
        plan["hparams_from"] = results["tune"]["path"]
    plan_file = job_dir / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    run_flm(spec["python"], *train_args(plan_file, spec["id"], Path(spec["home"]), spec["max_failures"],
                                        spec.get("backend")))
    return {"checkpoint": str(final_checkpoint(spec).relative_to(spec["home"]))}


def step_eval(spec: dict, job_dir: Path) -> dict:
    ev, out = spec["eval"], job_dir / "eval"
    run_flm(spec["python"], *eval_args(final_checkpoint(spec), ev, out))
    result = read_json(out / "iq.json") or {}
    return {"categories": result.get("categories"), "path": str(out.relative_to(spec["home"]))}


def step_deploy(spec: dict) -> dict:
    from api.deploy import deploy_checkpoint
    from api.schemas import DeploySettings
    from flm.config import FLMConfigError

    checkpoint = final_checkpoint(spec)
    name = spec["deploy"].get("name") or spec["id"]
    request = DeploySettings.model_validate(spec["deploy"]).request(str(checkpoint), name)
    try:
        url = deploy_checkpoint(request, spec["serve_url"])
    except FLMConfigError as e:
        raise StepFailed(str(e), 2, type(e).__name__) from None
    return {"name": name, "url": url, "checkpoint": str(checkpoint.relative_to(spec["home"]))}


def run_pipeline(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    job_dir = spec_path.parent
    state_path = job_dir / "pipeline.json"
    state = read_json(state_path) or {"steps": [
        {"name": n, "state": "PENDING" if n == "train" or spec.get(n) is not None else "SKIPPED", "seconds": None,
         "result": None} for n in STEPS]}
    results = {s["name"]: s["result"] for s in state["steps"] if s["state"] == "SUCCEEDED"}
    for step in state["steps"]:
        if step["state"] in ("SUCCEEDED", "SKIPPED"):
            continue
        step["state"], t0 = "RUNNING", time.perf_counter()
        write_json(state_path, state)
        print(f"=== pipeline step {step['name']} ===", flush=True)
        try:
            if step["name"] == "tune":
                result = step_tune(spec, job_dir)
            elif step["name"] == "train":
                result = step_train(spec, job_dir, results)
            elif step["name"] == "eval":
                result = step_eval(spec, job_dir)
            else:
                result = step_deploy(spec)
        except Exception as e:
            step["state"], step["seconds"] = "FAILED", round(time.perf_counter() - t0, 1)
            write_json(state_path, state)
            report = e.report if isinstance(e, StepFailed) else ErrorReport.of(e, 1)
            write_error(report.model_copy(update={"step": step["name"]}))
            if not isinstance(e, StepFailed):
                raise  # a bug of ours: its traceback goes to the job's log
            print(f"flm: error: pipeline step {step['name']}: {e}", file=sys.stderr, flush=True)
            return report.exit_code
        step["state"], step["result"] = "SUCCEEDED", result
        step["seconds"] = round(time.perf_counter() - t0, 1)
        results[step["name"]] = result
        write_json(state_path, state)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m api.pipeline SPEC.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_pipeline(Path(sys.argv[1])))

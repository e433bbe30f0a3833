"""api/jobs.py: every kind's Ray Job entrypoint is an argv list that the `flm` command (or `python -m api.pipeline` /
`api.deploy`) parses as meant, and that survives the one quoting at submission, spaces and quotes in paths included."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from api.jobs import JobRunner, deployment_entrypoint, entrypoint, error_file, failure_message, job_env
from api.settings import GatewaySettings
from api.store import Deployment, Job, get_job, open_store
from flm.cli import build_parser

JOB_ID = "job-0123456789"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path):
    return GatewaySettings(home=tmp_path / "a dir's root", job_python="/opt/py thon/bin/python3")


def flm_args(settings, job):
    argv = entrypoint(settings, job)
    assert shlex.split(shlex.join(argv)) == argv  # what Ray's shell gives the process
    assert argv[:3] == [settings.job_python, "-m", "flm.cli"]
    return build_parser().parse_args(argv[3:])


def test_train_eval_and_tune_entrypoints_are_flm_commands(settings):
    jd = settings.job_dir(JOB_ID)
    args = flm_args(settings, Job(id=JOB_ID, kind="train", spec={"max_failures": -1, "backend": "zero2"}))
    assert (args.plan, args.name, args.storage) == (str(jd / "plan.yaml"), JOB_ID, str(settings.home / "runs"))
    assert (args.address, args.max_failures, args.backend) == ("auto", -1, "zero2")
    assert flm_args(settings, Job(id=JOB_ID, kind="train", spec={"max_failures": 3})).backend is None
    spec = {"checkpoint_path": str(settings.home / "runs" / "x y" / "step_1"), "subtasks": "rule,pattern", "seed": 7,
            "n_items": 5}
    args = flm_args(settings, Job(id=JOB_ID, kind="eval", spec=spec))
    assert (args.model, args.subtasks, args.seed, args.n_items, args.out) == (
        spec["checkpoint_path"], "rule,pattern", 7, 5, str(jd / "eval"))
    args = flm_args(settings, Job(id=JOB_ID, kind="tune", spec={}))
    assert (args.search, args.out, args.address) == (str(jd / "search.yaml"), str(jd / "tune"), "auto")


def test_pipeline_and_deployment_entrypoints(settings):
    argv = entrypoint(settings, Job(id=JOB_ID, kind="pipeline", spec={}))
    assert argv == [settings.job_python, "-m", "api.pipeline", str(settings.job_dir(JOB_ID) / "spec.json")]
    up = deployment_entrypoint(settings, Deployment(id="tiny", state="DEPLOYING"))
    assert up == [settings.job_python, "-m", "api.deploy", "up", str(settings.deployment_dir("tiny") / "spec.json")]
    down = deployment_entrypoint(settings, Deployment(id="tiny", state="DELETING"))
    assert down == [settings.job_python, "-m", "api.deploy", "down", "tiny"]
    with pytest.raises(ValueError, match="unknown job kind"):
        entrypoint(settings, Job(id=JOB_ID, kind="nope", spec={}))


def test_a_failing_jobs_error_file_reaches_its_record(tmp_path):
    """A pipeline resubmitted after its train step succeeded, whose run left no checkpoint: its entrypoint, run as Ray
    runs it (one shell string, the environment the gateway submits with), fails the eval step and writes its error
    file; the reconciler's sync of Ray's FAILED puts that file's message, naming the step, on the job record (no log
    is read). Without a file, the error is Ray's message and the log's last lines, saying so."""
    from ray.job_submission import JobDetails, JobStatus, JobType

    settings = GatewaySettings(home=tmp_path, ray_address="http://127.0.0.1:9")  # Ray is never called
    sessions = open_store(settings.db_url)
    job = Job(id=JOB_ID, owner="me", kind="pipeline", spec={"kind": "pipeline"}, state="RUNNING", attempt=1,
              ray_submission_id=JOB_ID)
    with sessions.begin() as s:
        s.add(job)
    jd = settings.job_dir(JOB_ID)
    jd.mkdir(parents=True)
    (jd / "spec.json").write_text(json.dumps({"id": JOB_ID, "home": str(tmp_path), "python": settings.job_python,
                                              "eval": {"subtasks": "rule", "seed": 0}}))
    steps = [{"name": n, "state": state, "seconds": None, "result": None}
             for n, state in (("tune", "SKIPPED"), ("train", "SUCCEEDED"), ("eval", "PENDING"), ("deploy", "SKIPPED"))]
    (jd / "pipeline.json").write_text(json.dumps({"steps": steps}))
    command = shlex.join(entrypoint(settings, job))
    env = {**os.environ, **job_env(settings, error_file(jd, JOB_ID)), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, shell=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr

    ray_says = "Job entrypoint command failed with exit code 1, last available logs:\n..."
    JobRunner(settings, sessions)._sync(job, JobDetails(type=JobType.SUBMISSION, submission_id=JOB_ID,
                                                        status=JobStatus.FAILED, entrypoint=command, message=ray_says))
    stored = get_job(sessions, JOB_ID)
    assert stored.state == "FAILED"
    assert stored.error == f"pipeline step eval: training left no checkpoint in runs/{JOB_ID}"
    assert json.loads((jd / "pipeline.json").read_text())["steps"][2]["state"] == "FAILED"

    log = "step 1\nTraceback (most recent call last):\nKeyError: 'x'\n"
    assert failure_message(tmp_path / "none.json", log, ray_says) == (
        "Job entrypoint command failed with exit code 1 (it left no error file; its log ends: step 1 | Traceback (most "
        "recent call last): | KeyError: 'x')")


def test_a_pipeline_deploys_again_under_the_name_of_a_failed_deployment(tmp_path):
    """A FAILED deployment (its Ray cluster restarted, as after an earlier `flm demo`) and a pipeline whose deploy step
    then deployed the same name: the record is the pipeline's RUNNING deployment (it stayed FAILED, and requests for
    the model got 409). Another owner's record of the name is left alone."""
    from ray.job_submission import JobDetails, JobStatus, JobType

    from api.store import Deployment

    settings = GatewaySettings(home=tmp_path, ray_address="http://127.0.0.1:9")  # Ray is never called
    sessions = open_store(settings.db_url)
    job = Job(id=JOB_ID, owner="me", kind="pipeline", spec={"kind": "pipeline", "deploy": {"tp": 2}}, state="RUNNING",
              attempt=1, ray_submission_id=JOB_ID)
    with sessions.begin() as s:
        s.add(job)
        s.add(Deployment(id="tiny", owner="me", job_id=None, checkpoint="runs/old/checkpoints/step_1",
                         spec={"name": "tiny"}, state="FAILED", error="Serve has no application tiny", attempt=0))
        s.add(Deployment(id="theirs", owner="them", checkpoint="x", spec={"name": "theirs"}, state="FAILED",
                         attempt=0))
    jd = settings.job_dir(JOB_ID)
    jd.mkdir(parents=True)
    runner = JobRunner(settings, sessions)

    def deployed(name: str) -> None:
        result = {"name": name, "url": f"http://127.0.0.1:8000/{name}", "checkpoint": f"runs/{JOB_ID}/checkpoints/s"}
        (jd / "pipeline.json").write_text(json.dumps({"steps": [{"name": "deploy", "state": "SUCCEEDED",
                                                                 "result": result}]}))
        runner._sync(job, JobDetails(type=JobType.SUBMISSION, submission_id=JOB_ID, status=JobStatus.RUNNING,
                                     entrypoint="x"))

    deployed("tiny")
    deployed("theirs")
    with sessions.begin() as s:
        tiny, theirs = s.get(Deployment, "tiny"), s.get(Deployment, "theirs")
        assert (tiny.state, tiny.error, tiny.job_id, tiny.url) == ("RUNNING", None, JOB_ID, "http://127.0.0.1:8000/tiny")
        assert tiny.checkpoint == f"runs/{JOB_ID}/checkpoints/s" and tiny.spec == {"tp": 2, "name": "tiny"}
        assert (theirs.state, theirs.owner) == ("FAILED", "them")

"""api/jobs.py: every kind's Ray Job entrypoint is an argv list that the `flm` command (or `python -m api.pipeline` /
`api.deploy`) parses as meant, and that survives the one quoting at submission, spaces and quotes in paths included."""

import shlex

import pytest

from api.jobs import deployment_entrypoint, entrypoint
from api.settings import GatewaySettings
from api.store import Deployment, Job
from flm.cli import build_parser

JOB_ID = "job-0123456789"


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

"""cluster/train.py on an object store (a real S3 API: moto in server mode): stage 0 of the micro plan (its first two
stages) written to s3:// by one process, its local staging directory then lost, and stage 1 trained by two Ray Train
workers that both resume from S3 alone. The run on S3 (checkpoints, metric stream, attempts, Ray's records) equals
the single-process run; `flm cluster train --storage s3://...` relaunched reads the finished run from S3; an
unwritable URI exits 2. (One Ray Train run: each costs ~15 s of start-up here, and a third stage adds nothing that
S3 changes.)"""

import json
import shutil

import pytest
import yaml

from cluster.train import run_plan
from flm.checkpoint import MANIFEST, load_checkpoint
from flm.cli import main
from flm.config import GrowthPlan, flm_home
from flm.storage import staging_dir
from flm.train import Trainer, read_metrics
from tests.cluster.test_train import LOSS_ATOL, MODEL_RTOL, rel_diff
from tests.conftest import local_ray, local_s3, micro_plan

BUCKET, ROOT, NAME = "flm-runs", "s3://flm-runs/team", "micro"
PREFIX = f"team/{NAME}"


def s3_plan(data, out="") -> GrowthPlan:
    """The micro plan's first two stages, stage 1 on 2 workers (rank 1 pulls from S3 too)."""
    d = micro_plan(data, out).model_dump()
    d["stages"] = d["stages"][:2]
    d["stages"][1]["layout"] = {"workers": 2}
    return GrowthPlan.model_validate(d)


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray() as resources:
        yield resources


@pytest.fixture(scope="module")
def s3(ray_cluster):
    """The object store beside the cluster (its workers have AWS_* and FLM_HOME), with a bucket of this module's."""
    client = local_s3()
    client.create_bucket(Bucket=BUCKET)
    return client


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def download(client, prefix: str, dest):
    """Every object under `prefix` into `dest` (boto3, not flm/storage.py), but directory markers."""
    for key in keys(client, prefix + "/"):
        if key.endswith("/"):
            continue
        path = dest / key[len(prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(get(client, key))
    return dest


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3, micro_data):
    plan = s3_plan(micro_data)
    one = plan.model_copy(update={"train": plan.train.model_copy(update={"out": f"{ROOT}/{NAME}"})})
    Trainer(one).fit(stages=[0])
    shutil.rmtree(staging_dir(f"{ROOT}/{NAME}", flm_home()))  # stage 0 now lives on S3 only
    runs = run_plan(plan, ROOT, NAME, max_failures=0)
    print(f"\nstage 1 of the micro plan from S3 on Ray Train: {runs[1].seconds:.1f} s")
    return runs


def test_stages_resume_from_s3_and_equal_the_single_process_run(s3_run, s3, micro_data, tmp_path):
    reference = tmp_path / "single"
    Trainer(s3_plan(micro_data, reference)).fit()

    assert [(r.stage, r.status, r.world_size) for r in s3_run] == [(0, "skipped", None), (1, "trained", 2)]
    assert [r.checkpoint for r in s3_run] == [f"{ROOT}/{NAME}/checkpoints/step_{s:08d}" for s in (12, 24)]
    # every step once, each growth event, the same losses: read from S3 with boto3
    remote = download(s3, PREFIX, tmp_path / "remote")
    ours, ref = read_metrics(remote), read_metrics(reference)
    assert [(r["step"], r.get("event")) for r in ours] == [(r["step"], r.get("event")) for r in ref]
    assert [r["loss"] for r in ours if "loss" in r] == pytest.approx([r["loss"] for r in ref if "loss" in r],
                                                                     abs=LOSS_ATOL)
    assert {r["world_size"] for r in ours if "loss" in r and r["step"] > 12} == {2}
    # each checkpoint on S3 is complete (the loader verifies every hash its manifest lists)
    final = load_checkpoint(remote / "checkpoints/step_00000024")
    single = load_checkpoint(reference / "checkpoints/step_00000024")
    assert final.config == single.config and rel_diff(final.model, single.model) <= MODEL_RTOL
    assert all(json.loads((p / MANIFEST).read_text()) for p in (remote / "checkpoints").iterdir())
    attempts = [json.loads(line) for line in (remote / "attempts.jsonl").read_text().splitlines()]
    assert [(a["stage"], a["step"], a["world_size"]) for a in attempts] == [(1, 12, 2)]
    assert [(a["stage"], a["world_size"]) for a in s3_run[1].attempts] == [(1, 2)]
    # Ray Train's records of the stage next to the run, its checkpoint a pointer to ours on S3
    pointers = [key for key in keys(s3, f"team/{NAME}-stage1/") if key.endswith("flm_checkpoint.json")]
    assert pointers and json.loads(get(s3, pointers[-1]))["path"].startswith(f"{ROOT}/{NAME}/checkpoints/")


def test_relaunch_reads_the_finished_run_from_s3(s3_run, micro_data, tmp_path, capsys):
    shutil.rmtree(staging_dir(f"{ROOT}/{NAME}", flm_home()), ignore_errors=True)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(s3_plan(micro_data).model_dump(mode="json")))
    assert main(["cluster", "train", str(plan_file), "--storage", ROOT, "--name", NAME, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["status"], r["checkpoint"]) for r in runs] == [("skipped", r.checkpoint) for r in s3_run]
    assert [r["summary"]["steps"] for r in runs] == [12, 24]


def test_unwritable_uri_exits_2(s3, micro_data, tmp_path, capsys):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(s3_plan(micro_data).model_dump(mode="json")))
    assert main(["cluster", "train", str(plan_file), "--storage", "s3://no-such-bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "storage: cannot write to s3://no-such-bucket/runs" in err and "Traceback" not in err

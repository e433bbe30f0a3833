"""flm/storage.py: a run on s3:// (a real S3 API: moto in server mode) checkpoints and streams its metrics there, and
resumes from there after its local staging directory is lost, bit-identically to an uninterrupted local run."""

import hashlib
import json
import shutil

import pytest
import yaml

from flm.checkpoint import MANIFEST, list_checkpoints
from flm.cli import main
from flm.config import flm_home
from flm.storage import staging_dir
from flm.train import Trainer
from tests.conftest import micro_plan, moto_s3
from tests.flm.test_train import TIMING, stream

BUCKET, URI = "flm-runs", "s3://flm-runs/team/micro"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(BUCKET, tmp_path_factory.mktemp("home")) as client:
        yield client


def plan_on(data, out):
    return micro_plan(data, out, checkpoint_every=3)


def remote(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=f"team/micro/{key}")["Body"].read()


def remote_checkpoints(client) -> dict[str, dict]:
    """name -> manifest of every checkpoint under the URI that has one, read with boto3 (not flm/storage.py)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="team/micro/checkpoints/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    names = sorted({k.split("/")[3] for k in keys if k.endswith(f"/{MANIFEST}")})
    return {n: json.loads(remote(client, f"checkpoints/{n}/{MANIFEST}")) for n in names}


def test_run_on_s3_resumes_from_s3(micro_data, s3, tmp_path):
    reference = tmp_path / "ref"
    Trainer(plan_on(micro_data, reference)).fit(stages=[0])  # stage 0 of 3 (resume across growth: test_train.py)

    # `flm train PLAN --out s3://...`, stopped mid stage 0 (at step 11: after the checkpoint of step 9)
    plan_file = tmp_path / "micro.yaml"
    plan_file.write_text(yaml.safe_dump(plan_on(micro_data, "").model_dump(mode="json")))
    assert main(["train", str(plan_file), "--out", URI, "--max-steps", "11"]) == 0
    staged = staging_dir(URI, flm_home())
    assert staged.is_dir()

    # on S3: the same checkpoints as staged (pruned to keep_checkpoints=2 besides stage ends), every file's hash
    # as its manifest says, and the metric stream up to the newest checkpoint
    ckpts = remote_checkpoints(s3)
    assert list(ckpts) == [p.name for p in list_checkpoints(staged)] == ["step_00000006", "step_00000009"]
    for name, manifest in ckpts.items():
        for file, meta in manifest.items():
            data = remote(s3, f"checkpoints/{name}/{file}")
            assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["bytes"], meta["sha256"])
            assert data == (staged / "checkpoints" / name / file).read_bytes()
    lines = json.loads(remote(s3, "checkpoints/step_00000009/trainer_state.json"))["metrics_lines"]
    assert remote(s3, "metrics.jsonl").decode().splitlines()[:lines] == \
        (staged / "metrics.jsonl").read_text().splitlines()[:lines]

    # a torn upload (files without a manifest) newer than everything: never taken for a checkpoint
    s3.put_object(Bucket=BUCKET, Key="team/micro/checkpoints/step_00000099/model.safetensors", Body=b"\0" * 64)

    shutil.rmtree(staged)  # the node is gone: resume from S3 alone
    Trainer(plan_on(micro_data, URI)).fit(stages=[0])
    assert stream(staged) == stream(reference)
    on_s3 = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in remote(s3, "metrics.jsonl").decode().splitlines()]
    assert on_s3 == stream(reference)

    # the stage output on S3 is byte-identical to the uninterrupted local run's but for rng.pt: the global torch RNG
    # state differs after any resume, local ones too (a resume builds one more module, whose default init draws
    # from it before the checkpoint's weights replace it; the training itself does not draw from it)
    ckpts = remote_checkpoints(s3)
    assert list(ckpts) == ["step_00000009", "step_00000012"]  # step 6 pruned there too
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix="team/micro/checkpoints/step_00000099/").get("Contents")
    ref_manifest = json.loads((reference / "checkpoints" / "step_00000012" / MANIFEST).read_text())
    assert ckpts["step_00000012"].keys() == ref_manifest.keys()
    assert {k: v for k, v in ckpts["step_00000012"].items() if k != "rng.pt"} == \
        {k: v for k, v in ref_manifest.items() if k != "rng.pt"}

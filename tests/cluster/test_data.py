"""cluster/data.py: Ray Data reads (local paths and a real S3 API: the moto server beside the local cluster) and
tokenizes on a local 2-CPU cluster; the dataset equals `flm data prepare`'s byte for byte (shards, tokenizer,
manifest)."""

import pytest

from cluster.data import prepare_dataset_ray, shard_pieces
from flm.cli import main
from flm.data import Manifest, TokenizerSpec, prepare_dataset
from tests.conftest import local_ray, local_s3
from tests.flm.test_data import file_hashes, make_docs, mixed_corpus

BUCKET = "flm-corpus"
OPTIONS = dict(tokenizer=TokenizerSpec(vocab_size=300), val_fraction=0.25, seed=5, shard_tokens=900)


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2) as resources:
        yield resources


@pytest.fixture(scope="module")
def s3(ray_cluster):
    """The object store beside the cluster (its workers have AWS_*), with a bucket of this module's."""
    client = local_s3()
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A mixed corpus (txt, jsonl, parquet) and its single-process dataset."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(40, seed=3)
    mixed_corpus(root / "c", docs)
    prepare_dataset(str(root / "c"), root / "single", **OPTIONS)
    return root


def test_shard_pieces_cut_the_stream_like_the_shard_writer():
    assert shard_pieces([3, 5, 2], 4) == [[(0, 0, 3), (1, 0, 1)], [(1, 1, 4)], [(2, 0, 2)]]
    assert shard_pieces([4], 4) == [[(0, 0, 4)]] and shard_pieces([], 4) == []


def test_ray_data_equals_the_single_process_output(ray_cluster, corpus, tmp_path):
    m = prepare_dataset_ray(str(corpus / "c"), tmp_path / "ray", **OPTIONS)
    assert len(m.splits["train"].shards) >= 5
    assert file_hashes(tmp_path / "ray") == file_hashes(corpus / "single")
    assert m == Manifest.load(corpus / "single")


def test_ray_data_reads_an_object_store(ray_cluster, s3, corpus, tmp_path, capsys):
    """`flm cluster data prepare s3://...`: the same shards and tokenizer; the manifest differs only in its source."""
    for path in sorted(p for p in (corpus / "c").rglob("*") if p.is_file()):
        s3.put_object(Bucket=BUCKET, Key=f"corpus/{path.relative_to(corpus / 'c').as_posix()}", Body=path.read_bytes())
    out = tmp_path / "from-s3"
    assert main(["cluster", "data", "prepare", f"s3://{BUCKET}/corpus", "--out", str(out), "--address", "auto",
                 "--vocab-size", "300", "--val-fraction", "0.25", "--seed", "5"]) == 0
    assert "train tokens" in capsys.readouterr().out
    single = prepare_dataset(str(corpus / "c"), tmp_path / "single", **{**OPTIONS, "shard_tokens": 100_000_000})
    hashes = file_hashes(out)
    assert {k: v for k, v in hashes.items() if k != "manifest.json"} == \
        {k: v for k, v in file_hashes(tmp_path / "single").items() if k != "manifest.json"}
    assert Manifest.load(out).model_copy(update={"source": "x"}) == single.model_copy(update={"source": "x"})

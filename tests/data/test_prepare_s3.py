"""Prepare from and to S3: a real S3 API (moto on loopback) through s3fs, a real local Ray cluster.

Sources, images, shards and report all live in buckets; the driver and the Ray workers reach
the server through AWS_ENDPOINT_URL (see conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from llava_ray.config import ConfigError, LlavaRayConfig, dump_config
from llava_ray.data.prepare import (
    REPORT_FILE,
    SHARDS_FOLDER_KEY,
    decode_prepared_row,
    load_report,
    read_prepared,
    run_prepare,
    shards_location,
)
from llava_ray.data.samples import PreparedSample, SamplePreparer
from llava_ray.data.synthetic import generate
from llava_ray.training.stream import index_prepared
from llava_ray.utils.storage import filesystem

pytestmark = pytest.mark.integration

SAMPLES = 24
DATA_BUCKET, OUT_BUCKET = "llava-data", "llava-prepared"
MISSING_IMAGE = "images/train_000003.png"  # deleted from the bucket: one counted skip


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data generated locally and uploaded (less one image) to s3://llava-data/synthetic."""
    local = tmp_path_factory.mktemp("s3-synthetic")
    generate(local, samples=SAMPLES, eval_samples=2, seed=1)
    fs, _ = filesystem(f"s3://{DATA_BUCKET}")
    for bucket in (DATA_BUCKET, OUT_BUCKET):
        fs.mkdir(bucket)
    fs.put(str(local / "stage2.json"), f"{DATA_BUCKET}/synthetic/stage2.json")
    fs.put(str(local / "images") + "/", f"{DATA_BUCKET}/synthetic/images/", recursive=True)
    fs.rm(f"{DATA_BUCKET}/synthetic/{MISSING_IMAGE}")
    fs.invalidate_cache()
    return local


@pytest.fixture(scope="module")
def s3_run(
    ray_cluster, s3_dataset: Path, make_config: Callable[..., LlavaRayConfig]
) -> tuple[LlavaRayConfig, dict]:
    config = make_config([{"path": f"s3://{DATA_BUCKET}/synthetic/stage2.json"}], f"s3://{OUT_BUCKET}/stage2")
    return config, run_prepare(config)


def test_prepares_from_s3_into_s3(s3_run, s3_dataset: Path) -> None:
    _, report = s3_run
    text_only = sum("image" not in sample for sample in json.loads((s3_dataset / "stage2.json").read_text()))
    assert report["input"] == SAMPLES + text_only
    assert report["skipped"] == {"missing_image": 1}
    assert report["examples"]["missing_image"] == ["train-000003"]
    assert report["written"] == report["input"] - 1
    assert report["prepared_path"] == f"s3://{OUT_BUCKET}/stage2"


def test_shards_and_report_read_back_through_s3fs(
    s3_run, s3_dataset: Path, make_config, prepare_records
) -> None:
    config, report = s3_run
    fs, prefix = filesystem(config.data.prepared_path)
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{prefix}/{REPORT_FILE}")) == report
    # The shards live in the version prefix report.json names, written last (no rename on S3).
    assert report[SHARDS_FOLDER_KEY].startswith("v-")
    assert sorted(fs.ls(prefix, detail=False)) == [
        f"{prefix}/{REPORT_FILE}",
        f"{prefix}/{report[SHARDS_FOLDER_KEY]}",
    ]
    _, shards_prefix = filesystem(shards_location(config.data.prepared_path))
    assert shards_prefix == f"{prefix}/{report[SHARDS_FOLDER_KEY]}"
    shards = sorted(path for path in fs.ls(shards_prefix, detail=False) if path.endswith(".parquet"))
    assert len(shards) == report["shards"] >= 1
    tables = []
    for shard in shards:
        with fs.open(shard, "rb") as stream:
            tables.append(pq.read_table(stream))
    rows = pa.concat_tables(tables).to_pylist()
    samples = {sample["id"]: sample for sample in json.loads((s3_dataset / "stage2.json").read_text())}
    assert {row["id"] for row in rows} == set(samples) - {"train-000003"}
    # The same samples prepared in-process from the local copy give the same rows.
    local = SamplePreparer.from_config(make_config([{"path": str(s3_dataset / "stage2.json")}]))
    for row, expected in zip(rows, prepare_records(local, [samples[row["id"]] for row in rows]), strict=True):
        assert isinstance(expected, PreparedSample)
        input_ids, labels, images = decode_prepared_row(row)
        assert (input_ids, labels) == (expected.input_ids, expected.labels)
        assert [bytes(data) for data in row["images"]] == expected.images
        assert all(image.size == (64, 64) for image in images)


def test_ray_reads_the_shards_from_s3(s3_run) -> None:
    config, report = s3_run
    assert read_prepared(config.data.prepared_path).count() == report["written"]


def test_missing_buckets_and_keys_fail_fast(s3_endpoint, s3_dataset, make_config, tmp_path: Path) -> None:
    source = [{"path": f"s3://{DATA_BUCKET}/synthetic/stage2.json"}]
    with pytest.raises(
        ConfigError, match=r"s3://no-such-bucket/stage2.json': the bucket does not exist .*create it"
    ):
        run_prepare(make_config([{"path": "s3://no-such-bucket/stage2.json"}], tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"synthetic/nope.json': no such file .*check the bucket and key"):
        run_prepare(make_config([{"path": f"s3://{DATA_BUCKET}/synthetic/nope.json"}], tmp_path / "out"))
    with pytest.raises(
        ConfigError, match=r"data.prepared_path = 's3://no-such-out/x': the bucket does not exist"
    ):
        run_prepare(make_config(source, "s3://no-such-out/x"))
    with pytest.raises(
        ConfigError, match=r"image_root = 's3://no-such-images/root': the bucket does not exist"
    ):
        run_prepare(make_config([{**source[0], "image_root": "s3://no-such-images/root"}], tmp_path / "out"))


def test_a_killed_rerun_on_s3_leaves_the_previous_version_and_the_next_run_replaces_it(
    s3_run, s3_dataset: Path, make_config, tmp_path: Path
) -> None:
    """A real ``llava-ray prepare`` process rerunning into a finished prefix, SIGKILLed while it writes."""
    config, report = s3_run
    fs, prefix = filesystem(config.data.prepared_path)
    fs.copy(f"{prefix}/", f"{OUT_BUCKET}/rerun/", recursive=True)  # a finished run of our own to rerun into
    fs.invalidate_cache()
    uri = f"s3://{OUT_BUCKET}/rerun"
    report_bytes = fs.cat_file(f"{OUT_BUCKET}/rerun/{REPORT_FILE}")
    rerun_config = make_config(
        [{"path": f"s3://{DATA_BUCKET}/synthetic/stage2.json"}], uri, model_max_length=200
    )
    (tmp_path / "prepare.yaml").write_text(dump_config(rerun_config))
    rerun = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("llava-ray")),
            "prepare",
            "--config",
            str(tmp_path / "prepare.yaml"),
        ],
        # The session's cluster (and its S3 settings, inherited): the killed driver's actors end with it.
        env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert rerun.stdout is not None
    lines = []
    for line in rerun.stdout:  # prepare logs this line just before the write starts
        lines.append(line)
        if "[prepare] writing shards to " in line:
            break
    writing = rerun.poll() is None
    rerun.kill()
    lines += rerun.stdout.readlines()
    rerun.wait()
    assert writing, "".join(lines)[-4000:]
    fs.invalidate_cache()
    assert fs.cat_file(f"{OUT_BUCKET}/rerun/{REPORT_FILE}") == report_bytes
    assert load_report(uri) == report
    assert index_prepared(uri).rows["row"].size == report["written"]

    rerun_report = run_prepare(rerun_config)
    fs.invalidate_cache()
    assert rerun_report[SHARDS_FOLDER_KEY] != report[SHARDS_FOLDER_KEY]
    # The old version, and whatever the killed run left, are gone; the new one reads back whole.
    assert sorted(fs.ls(f"{OUT_BUCKET}/rerun", detail=False)) == [
        f"{OUT_BUCKET}/rerun/{REPORT_FILE}",
        f"{OUT_BUCKET}/rerun/{rerun_report[SHARDS_FOLDER_KEY]}",
    ]
    assert index_prepared(uri).rows["row"].size == rerun_report["written"]

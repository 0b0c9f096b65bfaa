"""Streaming the training input from the shards: the index, each rank's reads, resume, bounds."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llava_ray.training.stream import RankStream, Reads, index_prepared

ROWS_PER_GROUP = 4


def write_shards(root, keys_per_file):
    """Shards in the prepared layout (row groups of 4 rows) and a report that counts them."""
    root.mkdir(parents=True, exist_ok=True)
    for number, keys in enumerate(keys_per_file):
        table = pa.table(
            {
                "row": pa.array(keys, pa.int64()),
                "id": [f"s{k}" for k in keys],
                "source": ["synthetic"] * len(keys),
                "modality": ["image" if k % 3 else "text" for k in keys],
                "input_ids": [[k, k + 1] for k in keys],
                "labels": [[-100, k + 1] for k in keys],
                "length": pa.array([10 + k for k in keys], pa.int32()),
                "num_supervised": pa.array([1] * len(keys), pa.int32()),
                "images": [[f"image-{k}".encode()] if k % 3 else [] for k in keys],
            }
        )
        pq.write_table(table, root / f"part-{number}.parquet", row_group_size=ROWS_PER_GROUP)
    written = sum(len(keys) for keys in keys_per_file)
    (root / "report.json").write_text(json.dumps({"written": written}))
    return root


@pytest.fixture
def shards(tmp_path):
    # Keys out of file order: the index sorts by key, whatever the files' order.
    return write_shards(tmp_path / "prepared", [list(range(10, 20)), list(range(0, 10))])


def keys_of(batch):
    return [row["row"] for row in batch]


def test_the_index_holds_the_light_columns_and_where_each_row_lives(shards):
    index = index_prepared(str(shards))
    rows = index.rows
    assert rows["row"].tolist() == list(range(20))
    assert list(rows.columns) == ["row", "length", "is_image", "num_supervised", "unit", "offset"]
    assert rows["is_image"].tolist() == [bool(k % 3) for k in range(20)]
    # part-0 (keys 10-19) holds units 0-2, part-1 (keys 0-9) units 3-5, each of 4 rows at most
    assert len(index.units) == 6 and index.units.unit_file.tolist() == [0, 0, 0, 1, 1, 1]
    assert index.units.unit_group.tolist() == [0, 1, 2, 0, 1, 2]
    first = rows[rows["row"] == 13].iloc[0]
    assert (first["unit"], first["offset"]) == (0, 3)
    key_19 = rows[rows["row"] == 19].iloc[0]
    assert (key_19["unit"], key_19["offset"]) == (2, 1)


def test_a_count_that_differs_from_the_report_is_an_error(shards):
    (shards / "report.json").write_text(json.dumps({"written": 21}))
    with pytest.raises(RuntimeError, match=r"hold 20 rows but report\.json counts 21"):
        index_prepared(str(shards))


def stream_of(index, keys, **kwargs):
    reads = Reads.of(index.rows.set_index("row").loc[keys].reset_index())
    return RankStream(index.units, reads, micro_batch_size=2, collate=list, **kwargs)


def test_a_rank_gets_its_rows_in_schedule_order_and_resumes_at_its_position(shards):
    index = index_prepared(str(shards))
    keys = [17, 2, 9, 9, 0, 13, 4, 5]  # a row may come twice (two epochs)
    batches = list(stream_of(index, keys, reads_per_epoch=4))
    assert [keys_of(b) for b in batches] == [[17, 2], [9, 9], [0, 13], [4, 5]]
    row = batches[0][1]
    assert row["input_ids"].tolist() == [2, 3] and row["labels"].tolist() == [-100, 3]
    assert row["images"] == [b"image-2"]
    resumed = list(stream_of(index, keys, reads_per_epoch=4, start=4))
    assert [keys_of(b) for b in resumed] == [[0, 13], [4, 5]]
    with pytest.raises(ValueError, match="not on a micro-batch boundary"):
        stream_of(index, keys, start=3)


def test_a_rank_holds_only_the_rows_of_the_units_it_has_read(shards):
    index = index_prepared(str(shards))
    keys = list(range(20))  # unit after unit: nothing needs holding beyond the read-ahead
    stream = stream_of(index, keys, read_ahead=0, queue_depth=1)
    assert [k for batch in stream for k in keys_of(batch)] == keys
    assert stream.rows_held_peak <= ROWS_PER_GROUP


def test_rows_that_no_longer_match_the_schedule_stop_training(shards):
    index = index_prepared(str(shards))
    write_shards(shards, [list(range(100, 110)), list(range(0, 10))])  # prepared again, other keys
    with pytest.raises(RuntimeError, match="holds row 100, the schedule expected 10"):
        list(stream_of(index, [10, 11]))


def test_reads_stream_from_s3(shards, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("llava-stream")
    fs.put(str(shards) + "/", "llava-stream/prepared/", recursive=True)
    index = index_prepared("s3://llava-stream/prepared")
    assert index.units.files[0] == "s3://llava-stream/prepared/part-0.parquet"
    assert [keys_of(b) for b in stream_of(index, [3, 15, 0, 19])] == [[3, 15], [0, 19]]


def test_schedule_positions_become_reads_in_order(shards):
    from llava_ray.training.driver import rank_reads
    from llava_ray.training.schedule import build_schedule

    index = index_prepared(str(shards))
    rows = index.rows
    schedule = build_schedule(
        rows["length"].to_numpy(),
        rows["is_image"].to_numpy(),
        rows["num_supervised"].to_numpy(),
        global_batch_size=8,
        micro_batch_size=2,
        world_size=2,
        epochs=1,
        seed=0,
        units=rows["unit"].to_numpy(),
        window=8,
    )
    reads = rank_reads(rows, schedule)
    for rank, rank_read in enumerate(reads):
        assert rank_read.row.tolist() == rows["row"].to_numpy()[schedule.rank_rows(rank)].tolist()
    streamed = [
        k
        for r in reads
        for b in RankStream(index.units, r, micro_batch_size=2, collate=list)
        for k in keys_of(b)
    ]
    assert sorted(streamed) == sorted(np.concatenate([r.row for r in reads]).tolist())

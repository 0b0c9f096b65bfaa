"""The stage job's driver: problems found before any work, and the rows each rank reads."""

import pandas as pd
import pytest
import ray

from llava_ray.config import load_config
from llava_ray.training.driver import scheduled_datasets, train_problems


def test_train_problems_are_found_before_any_work(tmp_path):
    nothing = load_config(None, ["model.preset=tiny"])
    assert train_problems(nothing) == [
        "neither data.prepared_path (shards written by `llava-ray prepare`) nor data.sources (prepared "
        "on the fly, streamed into training) is set; set one"
    ]
    unprepared = load_config(
        None, ["model.preset=tiny", f"data.prepared_path={tmp_path}", "train.stage=finetune"]
    )
    problems = train_problems(unprepared)
    assert (
        "holds no prepared data (no report.json); run `llava-ray prepare --config ...` first" in problems[0]
    )
    assert "set model.init_from to the pretrain run's final folder" in problems[1]


def _record_reads(batch: pd.DataFrame, log: str) -> pd.DataFrame:
    with open(log, "a") as file:
        file.write(f"{len(batch)}\n")
    return batch


@pytest.mark.integration
def test_one_pass_gives_every_plan_its_rows_in_order(ray_cluster, tmp_path):
    log = tmp_path / "reads.log"
    rows = ray.data.from_items(
        [{"row": i, "payload": f"sample-{i}"} for i in range(10)], override_num_blocks=3
    ).map_batches(_record_reads, batch_format="pandas", fn_args=(str(log),))
    plans = {
        "rank0": pd.DataFrame({"row": [3, 1, 3, 7], "seq": [0, 1, 2, 3]}),  # row 3 in two epochs
        "rank1": pd.DataFrame({"row": [0, 9, 2, 5], "seq": [0, 1, 2, 3]}),
        "val0": pd.DataFrame({"row": [4], "seq": [0]}),
        "val1": pd.DataFrame({"row": [8], "seq": [0]}),
    }
    datasets = scheduled_datasets(rows, plans)
    assert sum(int(line) for line in log.read_text().split()) == 10  # the rows were read once
    assert set(datasets) == set(plans)
    for name, plan in plans.items():
        got = datasets[name].to_pandas()
        assert list(got.columns) == ["row", "payload", "seq"], name
        assert got["row"].tolist() == plan["row"].tolist() and got["seq"].tolist() == plan["seq"].tolist()
        assert got["payload"].tolist() == [f"sample-{r}" for r in plan["row"]]
    assert sum(int(line) for line in log.read_text().split()) == 10  # and not again when iterated


@pytest.mark.integration
def test_a_scheduled_row_missing_from_the_data_is_an_error(ray_cluster):
    rows = ray.data.from_items([{"row": i} for i in range(3)])
    with pytest.raises(RuntimeError, match="gave 2 scheduled rows, the schedule has 3"):
        scheduled_datasets(rows, {"rank0": pd.DataFrame({"row": [0, 1, 5], "seq": [0, 1, 2]})})

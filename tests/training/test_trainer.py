"""The stage job's driver: problems found before any work."""

from llava_ray.config import load_config
from llava_ray.training.driver import train_problems


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

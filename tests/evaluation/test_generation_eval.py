"""Batched generation through the runner (in process and on a Ray Data actor pool) and the synthetic benchmark.

Invariants first: greedy answers do not depend on the batch size, and the actor pool answers
exactly what the in-process predictor answers. Then the synthetic benchmark's scoring on fixed
predictions (hand-counted), and a whole ``run_evaluate`` on the tiny overfit model with MLflow.
"""

from __future__ import annotations

import json
import uuid

import pytest
import s3fs
import yaml
from mlflow import MlflowClient

from llava_ray.config import ConfigError, LlavaRayConfig, dump_config, load_config
from llava_ray.config.evaluation import EvaluateConfig
from llava_ray.evaluation.batch_generate import GenerationSettings, Predictor, predict
from llava_ray.evaluation.items import EvalItem, Outcome, load_eval_items
from llava_ray.evaluation.job import run_evaluate
from llava_ray.evaluation.synthetic import score
from llava_ray.model.export import export_hf


@pytest.fixture(scope="module")
def items(synthetic_eval_dir):
    """The eval.json questions, a text-only question, and three that cannot be asked."""
    loaded = load_eval_items(str(synthetic_eval_dir / "eval.json"))
    return [
        *loaded,
        EvalItem("text-only", [{"from": "human", "value": "What is 2 plus 3?"}]),
        EvalItem("no-file", loaded[0].conversation, str(synthetic_eval_dir / "images" / "missing.png")),
        EvalItem("no-placeholder", [{"from": "human", "value": "What color?"}], loaded[0].image),
        EvalItem("too-long", [{"from": "human", "value": "What is 2 plus 3? " * 400}]),
    ]


@pytest.fixture(scope="module")
def settings(trained_model_dir):
    return GenerationSettings(model=str(trained_model_dir), max_new_tokens=12)


@pytest.fixture(scope="module")
def predictor(settings):
    return Predictor(settings)


@pytest.fixture(scope="module")
def in_process(items, settings, predictor):
    return predict(items, settings, batch_size=4, predictor=predictor)


def test_every_item_gets_an_answer_or_a_counted_reason(items, in_process):
    assert set(in_process) == {item.id for item in items}
    errors = {key: outcome.error for key, outcome in in_process.items() if outcome.error}
    assert errors == {
        "no-file": "image_missing",
        "no-placeholder": "image_placeholder_mismatch",
        "too-long": "prompt_too_long",
    }
    assert "missing.png" in in_process["no-file"].detail
    answered = [outcome.prediction for outcome in in_process.values() if not outcome.error]
    assert all(isinstance(answer, str) and "</s>" not in answer for answer in answered)


def test_batched_greedy_generation_equals_one_at_a_time(items, settings, predictor, in_process):
    one_at_a_time = predict(items, settings, batch_size=1, predictor=predictor)
    assert one_at_a_time == in_process
    # Not a degenerate model: different questions get different answers.
    assert len({outcome.prediction for outcome in in_process.values()}) > 3


def test_actor_pool_answers_like_in_process(ray_cluster, items, settings, in_process):
    on_actors = predict(items, settings, batch_size=4, num_actors=2, num_cpus_per_actor=0.5)
    assert on_actors == in_process


def test_an_exported_hugging_face_folder_answers_alike(items, trained_model_dir, in_process, tmp_path):
    hf_dir = export_hf(str(trained_model_dir), tmp_path / "hf")
    hf_predictor = Predictor(GenerationSettings(model=str(hf_dir), max_new_tokens=12))
    # The template is recognised from the chat template the export wrote, not from a name.
    assert hf_predictor.loaded.model.template is None and hf_predictor.loaded.template == "vicuna_v1"
    assert predict(items, hf_predictor.settings, batch_size=4, predictor=hf_predictor) == in_process


def test_duplicate_ids_are_refused(items, settings, predictor):
    with pytest.raises(ValueError, match=r"item ids must be unique; repeated: \['text-only'\]"):
        predict([items[-4], items[-4]], settings, predictor=predictor)


# ---- scoring -------------------------------------------------------------------------------------


def question(item_id: str, question_type: str, answer: str, choices: list[str], earlier: int = 0) -> EvalItem:
    """An item asking ``question_type``, after ``earlier`` answered turns (a follow-up when any)."""
    fields = {"question_type": question_type, "answer": answer, "choices": choices}
    turns = [{"from": "human", "value": "<image>\nshape?"}, {"from": "gpt", "value": "circle"}] * earlier
    turns.append({"from": "human", "value": f"{question_type}?" if earlier else f"<image>\n{question_type}?"})
    return EvalItem(item_id, turns, "x.png", fields)


def test_synthetic_scoring_by_hand():
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    counts = ["1", "2", "3", "4"]
    items = [
        question("a", "color", "red", colors),
        question("b", "color", "blue", colors, earlier=1),
        question("c", "color", "green", colors),
        question("d", "count", "2", counts, earlier=2),
        question("e", "count", "3", counts),
        question("f", "count", "4", counts),
    ]
    outcomes = {
        "a": Outcome("Red."),  # normalised: correct
        "b": Outcome("magenta"),  # wrong and not among the choices
        "c": Outcome("blue"),  # wrong, among the choices
        "d": Outcome(" 2 "),
        "e": Outcome(None, "image_missing", "no image file at x.png"),  # excluded, counted elsewhere
        "f": Outcome("four"),  # not among the choices ("4" is)
    }
    rows, summary = score(items, outcomes)
    by_type = summary["by_type"]
    assert by_type["color"] == {
        "count": 3,
        "correct": 1,
        "accuracy": 1 / 3,
        "chance": 1 / 6,
        "not_in_choices": 1,
    }
    assert by_type["count"] == {
        "count": 2,
        "correct": 1,
        "accuracy": 0.5,
        "chance": 0.25,
        "not_in_choices": 1,
    }
    # First turns a, c, f (e failed); follow-ups b (after one turn) and d (after two).
    assert by_type["first_turn"] == {
        "count": 3,
        "correct": 1,
        "accuracy": 1 / 3,
        "chance": pytest.approx((2 / 6 + 1 / 4) / 3),
        "not_in_choices": 1,
    }
    assert by_type["follow_up"] == {
        "count": 2,
        "correct": 1,
        "accuracy": 0.5,
        "chance": pytest.approx((1 / 6 + 1 / 4) / 2),
        "not_in_choices": 1,
    }
    assert by_type["overall"]["accuracy"] == 2 / 5
    assert by_type["overall"]["chance"] == pytest.approx((3 / 6 + 2 / 4) / 5)
    assert list(by_type) == ["color", "count", "first_turn", "follow_up", "overall"]
    metrics = summary["metrics"]
    assert metrics["accuracy/color"] == 1 / 3 and metrics["chance/count"] == 0.25
    assert metrics["accuracy/first_turn"] == 1 / 3 and metrics["accuracy/follow_up"] == 0.5
    assert [row.get("correct") for row in rows] == [True, False, False, True, None, False]
    assert [row["turn"] for row in rows] == [1, 2, 1, 3, 1, 1]
    assert rows[4]["error"] == "image_missing" and rows[1]["in_choices"] is False


def test_synthetic_scoring_without_follow_ups_reports_none_not_zero():
    _, summary = score([question("a", "color", "red", ["red", "blue"])], {"a": Outcome("red")})
    assert summary["by_type"]["follow_up"]["count"] == 0
    assert (
        summary["metrics"]["accuracy/follow_up"] is None and summary["metrics"]["accuracy/first_turn"] == 1.0
    )


# ---- the whole job -------------------------------------------------------------------------------


def test_synthetic_benchmark_end_to_end_with_mlflow(trained_model_dir, synthetic_eval_dir, tmp_path):
    config = EvaluateConfig(
        model=str(trained_model_dir),
        benchmark="synthetic",
        data_path=str(synthetic_eval_dir / "eval.json"),
        output_dir=str(tmp_path / "out"),
        batch_size=4,
        num_actors=0,
    )
    root = LlavaRayConfig.model_validate(
        {"run": {"name": "eval-test"}, "evaluate": {"judge": {"api_key": "sk-never-logged"}}}
    )
    summary = run_evaluate(config, root)

    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    eval_items = json.loads((synthetic_eval_dir / "eval.json").read_text())
    assert len(rows) == len(eval_items) == summary["counts"]["items"] == summary["counts"]["answered"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"] == summary["metrics"]

    def in_group(name: str, row: dict) -> bool:
        groups = {"overall": True, "first_turn": row["turn"] == 1, "follow_up": row["turn"] > 1}
        return groups.get(name, row["type"] == name)

    choices = {item["question_type"]: len(item["choices"]) for item in eval_items}
    for name, table in summary["by_type"].items():
        typed = [row for row in rows if in_group(name, row)]
        assert typed and table["count"] == len(typed), name
        assert table["accuracy"] == sum(row["correct"] for row in typed) / len(typed)
        if name in choices:
            assert table["chance"] == pytest.approx(1 / choices[name])
    # eval.json holds one follow-up per held-out image, scored after one or more answered turns.
    assert summary["by_type"]["follow_up"]["count"] == 4 and all(row["turn"] >= 1 for row in rows)
    assert {"id", "question", "prediction", "answer", "correct", "type", "in_choices", "turn"} <= set(rows[0])
    # Overfit on these very questions: far above guessing.
    assert summary["metrics"]["accuracy"] > 2 * summary["metrics"]["chance"]

    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["llava_ray.job"] == "evaluate"
    assert run.data.metrics["eval/accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert "eval/chance/color" in run.data.metrics
    artifacts = {entry.path for entry in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/results.jsonl", "evaluation/summary.json"}
    assert "sk-never-logged" not in json.dumps(run.data.params)
    assert run.data.params["evaluate.judge.api_key"] == "***"


def test_model_data_images_and_results_on_s3(s3_endpoint, trained_model_dir, synthetic_eval_dir):
    fs = s3fs.S3FileSystem()  # the s3_endpoint fixture points AWS_ENDPOINT_URL at the loopback server
    bucket = f"eval-{uuid.uuid4().hex[:8]}"  # fresh URLs: downloads are cached by URL
    fs.mkdir(bucket)
    fs.put(f"{trained_model_dir}/", f"{bucket}/model/", recursive=True)
    fs.put(f"{synthetic_eval_dir}/images/", f"{bucket}/data/images/", recursive=True)
    fs.put(str(synthetic_eval_dir / "eval.json"), f"{bucket}/data/eval.json")
    config = EvaluateConfig(
        model=f"s3://{bucket}/model",
        data_path=f"s3://{bucket}/data/eval.json",  # images are relative to its folder
        output_dir=f"s3://{bucket}/out",
        num_actors=0,
        limit=4,
    )
    summary = run_evaluate(config)
    assert summary["counts"]["answered"] == 4
    assert sorted(fs.ls(f"{bucket}/out")) == [f"{bucket}/out/results.jsonl", f"{bucket}/out/summary.json"]
    assert len(fs.cat(f"{bucket}/out/results.jsonl").decode().splitlines()) == 4


def test_a_folder_that_holds_no_model_is_reported(tmp_path, synthetic_eval_dir):
    (tmp_path / "weights.bin").write_bytes(b"")
    config = EvaluateConfig(model=str(tmp_path), data_path=str(synthetic_eval_dir / "eval.json"))
    with pytest.raises(
        ConfigError,
        match=r"evaluate.model='.*' is neither a llava-ray model folder .*found \['weights.bin'\]",
    ):
        run_evaluate(config)


def test_every_problem_is_reported_before_any_work(tmp_path):
    config = EvaluateConfig(
        benchmark="llava_bench",
        data_path=str(tmp_path / "nope.jsonl"),
        num_actors=0,
        num_gpus_per_actor=1,
    )
    with pytest.raises(ConfigError) as raised:
        run_evaluate(config)
    message = str(raised.value)
    assert "6 problem(s)" in message
    assert "evaluate.model is not set" in message
    assert "evaluate.context is not set" in message
    assert f"evaluate.data_path={str(tmp_path / 'nope.jsonl')!r} does not exist" in message
    assert "evaluate.reference_answers is not set" in message
    assert "evaluate.judge.model is not set" in message
    assert "set num_actors >= 1" in message


def test_the_evaluate_section_of_a_config_file(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(
        yaml.safe_dump({"evaluate": {"model": "m", "benchmark": "scienceqa", "judge": {"model": "judge"}}})
    )
    config = load_config(path, ["evaluate.batch_size=4", "evaluate.judge.api_key=sk-secret"])
    evaluate = config.evaluate
    assert (evaluate.model, evaluate.benchmark, evaluate.batch_size, evaluate.judge.model) == (
        "m",
        "scienceqa",
        4,
        "judge",
    )
    assert evaluate.resolved_max_new_tokens() == 128
    assert "sk-secret" not in repr(evaluate) and "sk-secret" not in dump_config(config)
    with pytest.raises(ConfigError, match=r"evaluate.bach_size: unknown key. Did you mean 'batch_size'\?"):
        load_config(path, ["evaluate.bach_size=4"])
    with pytest.raises(ConfigError, match=r"evaluate.judge.base_url = 'localhost:8000': use an http"):
        load_config(path, ["evaluate.judge.base_url=localhost:8000"])

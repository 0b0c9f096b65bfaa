"""Config loading, overrides, stage recipes and validation messages."""

from pathlib import Path

import pytest
import yaml

from llava_ray.cli import main
from llava_ray.config import ConfigError, flatten_config, load_config
from llava_ray.config.loader import SHIPPED_CONFIGS, SHIPPED_SWEEPS, apply_overrides
from llava_ray.config.sweep import load_sweep
from llava_ray.workflows.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "platform/llava_ray/assets"  # the shipped YAMLs are package data (jobs/* link here)
SHIPPED = sorted([*(ASSETS / "configs").rglob("*.yaml"), *(ASSETS / "sweeps").rglob("*.yaml")])


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_follow_llava_1_5_pretrain_recipe():
    config = load_config()
    assert config.train.stage == "pretrain" and config.train.trainable == "projector"
    assert config.train.learning_rate == 1e-3 and config.train.global_batch_size == 256
    assert config.deepspeed.zero_stage == 2 and config.data.template == "plain"
    assert config.model.projector == "mlp2x_gelu" and config.model.vision_select_layer == -2
    assert config.model.model_max_length == 2048 and config.train.warmup_ratio == 0.03
    assert config.train.weight_decay == 0.0


@pytest.mark.parametrize(("trainable", "lr", "projector_lr"), [("full", 2e-5, None), ("lora", 2e-4, 2e-5)])
def test_finetune_recipes(trainable, lr, projector_lr):
    config = load_config(None, ["train.stage=finetune", f"train.trainable={trainable}"])
    assert config.train.learning_rate == lr and config.train.projector_learning_rate == projector_lr
    assert config.train.global_batch_size == 128 and config.deepspeed.zero_stage == 3
    assert config.data.template == "vicuna_v1"
    if trainable == "lora":
        assert (config.train.lora.r, config.train.lora.alpha) == (128, 256)


def test_explicit_values_beat_the_recipe(tmp_path):
    path = write(
        tmp_path, {"train": {"stage": "finetune", "learning_rate": 1e-5}, "deepspeed": {"zero_stage": 2}}
    )
    config = load_config(path)
    assert config.train.learning_rate == 1e-5 and config.deepspeed.zero_stage == 2
    assert config.train.global_batch_size == 128  # still from the recipe


def test_overrides_parse_yaml_values_and_reach_list_items(tmp_path):
    path = write(tmp_path, {"data": {"sources": [{"path": "a.json"}, {"path": "b.jsonl"}]}})
    config = load_config(
        path,
        [
            "data.sources.1.repeat=3",
            "train.learning_rate=2e-4",
            "model.lm_config_overrides.num_hidden_layers=2",
        ],
    )
    assert config.data.sources[1].repeat == 3 and config.data.sources[0].repeat is None
    assert config.train.learning_rate == pytest.approx(2e-4)
    assert config.model.lm_config_overrides == {"num_hidden_layers": 2}


def test_overrides_leave_the_input_untouched():
    raw = {"train": {"stage": "pretrain"}}
    result, problems = apply_overrides(raw, ["train.stage=finetune"])
    assert raw == {"train": {"stage": "pretrain"}} and result["train"]["stage"] == "finetune" and not problems


def test_unknown_key_and_invalid_value_fail_in_one_message(tmp_path):
    path = write(tmp_path, {"model": {"projectr": "linear"}, "train": {"learning_rate": -1}})
    with pytest.raises(ConfigError, match=r"2 problem\(s\)") as caught:
        load_config(path)
    message = str(caught.value)
    assert "model.projectr: unknown key. Did you mean 'projector'?" in message
    assert "train.learning_rate = -1: Input should be greater than 0" in message


def test_every_problem_is_collected_with_value_and_fix(tmp_path):
    path = write(
        tmp_path,
        {
            "model": {"projector": "mlp2x_relu", "vision_select_layer": 0},
            "data": {"sources": [{"path": "a.json", "weight": 0.5, "repeat": 2}], "image_aspect": "fill"},
            "deepspeed": {"zero_stage": 5},
            "trian": {},
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["nonsense", "run.name=has space"])
    problems = caught.value.problems
    assert len(problems) == 8, problems
    text = "\n".join(problems)
    assert "override 'nonsense': expected dotted.key=value" in text
    assert "model.projector = 'mlp2x_relu': use 'linear', 'identity' or 'mlp{N}x_gelu'" in text
    assert "model.vision_select_layer = 0: layer 0 is the patch embedding" in text
    assert "data.sources.0: set either 'weight' or 'repeat', not both" in text
    assert "data.image_aspect = 'fill': Input should be 'pad', 'crop' or 'resize'" in text
    assert "deepspeed.zero_stage = 5: Input should be 0, 1, 2 or 3" in text
    assert "trian: unknown key. Did you mean 'train'?" in text
    assert "run.name = 'has space': use letters, digits" in text


def test_cross_section_problems_name_keys_and_fix():
    with pytest.raises(
        ConfigError, match=r"not a multiple of train.micro_batch_size x scaling.num_workers = 32"
    ):
        load_config(
            None, ["train.global_batch_size=100", "train.micro_batch_size=16", "scaling.num_workers=2"]
        )
    with pytest.raises(
        ConfigError, match=r"stage 1 trains only the projector; set train.trainable=projector"
    ):
        load_config(None, ["train.trainable=full"])
    with pytest.raises(ConfigError, match=r"'plain' drops the instructions"):
        load_config(None, ["train.stage=finetune", "data.template=plain"])
    with pytest.raises(ConfigError, match=r"offload_params needs zero_stage 3"):
        load_config(None, ["deepspeed.offload_params=true"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass an existing YAML file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections, not list"):
        load_config(bad)


def test_flatten_config_uses_dotted_keys():
    flat = flatten_config(load_config())
    assert flat["train.learning_rate"] == 1e-3 and flat["train.lora.r"] == 128
    assert flat["data.sources"] == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_validates_and_says_how_to_run(path, tmp_path, monkeypatch):
    assert path.read_text().startswith("#"), "shipped YAMLs start with a comment saying what they do"
    if path.name == "pipeline.yaml":
        # A pipeline's evaluation data must exist before anything starts: give it the synthetic file.
        monkeypatch.chdir(tmp_path)
        (tmp_path / "data/synthetic").mkdir(parents=True)
        (tmp_path / "data/synthetic/eval.json").write_text("[]")
        load_pipeline(path)
    elif "sweeps" in path.parts:
        load_sweep(path)
    else:
        load_config(path)


def test_shipped_configs_exist():
    assert len(SHIPPED) >= 9


def test_shipped_configs_are_package_data_and_jobs_links_to_them():
    assert Path(str(SHIPPED_CONFIGS)) == ASSETS / "configs" and Path(str(SHIPPED_SWEEPS)) == ASSETS / "sweeps"
    # `ray job submit --working-dir .` users name jobs/configs/... and jobs/sweeps/...; Ray copies what a
    # link points to.
    for folder in ("configs", "sweeps"):
        link = REPO / "jobs" / folder
        assert link.is_symlink() and link.resolve() == ASSETS / folder
    assert (REPO / "jobs/configs/tiny/pretrain.yaml").samefile(ASSETS / "configs/tiny/pretrain.yaml")


def test_cli_validate_prints_resolved_config_or_exits_2(tmp_path, capsys):
    good = write(tmp_path, {"model": {"preset": "tiny"}})
    assert main(["validate", "--config", str(good), "train.max_steps=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 5 and printed["model"]["preset"] == "tiny"
    assert main(["validate", "--config", str(good), "train.max_stpes=5"]) == 2
    assert "train.max_stpes: unknown key. Did you mean 'max_steps'?" in capsys.readouterr().err


def test_train_attention_is_a_typed_switch(tmp_path):
    assert load_config().train.attention == "segments"
    assert load_config(None, ["train.attention=varlen"]).train.attention == "varlen"
    with pytest.raises(ConfigError, match=r"train\.attention"):
        load_config(None, ["train.attention=flash"])

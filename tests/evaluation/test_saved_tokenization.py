"""``data.tokenization`` travels with a saved model like its template, so evaluation and chat build prompts with the
ids the model trained on."""

import json
from pathlib import Path

import pytest

from llava_ray.config.loader import validate_config
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import tokenize_prompt
from llava_ray.conversation.tokenizer import load_tokenizer, load_tokenizer_dir
from llava_ray.evaluation.loaded_model import load_inference_model
from llava_ray.model.build import build_llava_model
from llava_ray.model.export import TOKENIZATION_KEY, export_hf, load_hf_llava
from llava_ray.model.llava import LlavaModel
from llava_ray.model.weights import CONFIG_FILE
from llava_ray.training.final_model import empty_copy

QUESTION = [{"from": "human", "value": "<image>\nWhat is on the left?"}]


@pytest.fixture(scope="module")
def saved_dir(vicuna_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model with the Vicuna-layout tokenizer, saved as training saves one in 'llava' mode."""
    model_config = ModelConfig(preset="tiny", init="random", tokenizer=str(vicuna_tokenizer_dir))
    tokenizer = load_tokenizer(model_config)
    model = build_llava_model(model_config, tokenizer, seed=0)
    model.template, model.tokenization = "vicuna_v1", "llava"  # what training/worker.py sets from data.*
    config = validate_config(
        {
            "model": model_config.model_dump(),
            "train": {"stage": "finetune"},
            "data": {"tokenization": "llava"},
        }
    )
    assert empty_copy(model, config).tokenization == "llava"  # the copy save_final_model writes
    return model.save_pretrained(tmp_path_factory.mktemp("model"), tokenizer)


def test_the_mode_is_recorded_and_read_back(saved_dir: Path):
    assert json.loads((saved_dir / CONFIG_FILE).read_text())["tokenization"] == "llava"
    assert LlavaModel.from_pretrained(saved_dir).tokenization == "llava"


def test_evaluation_prompts_use_the_recorded_mode(saved_dir: Path, vicuna_tokenizer_dir: Path):
    loaded = load_inference_model(str(saved_dir))
    assert (loaded.template, loaded.model.tokenization) == ("vicuna_v1", "llava")
    positions = loaded.model.image_positions
    llava = tokenize_prompt(QUESTION, "vicuna_v1", loaded.tokenizer, positions, tokenization="llava")
    joined = tokenize_prompt(QUESTION, "vicuna_v1", loaded.tokenizer, positions, tokenization="joined")
    assert len(llava) == len(joined) + 1  # the ▁ after the image
    assert loaded.prompt_length(QUESTION) == len(llava)


def test_folders_saved_before_the_mode_was_recorded_load_as_joined(saved_dir: Path, tmp_path: Path):
    for path in saved_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    del record["tokenization"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    assert LlavaModel.from_pretrained(tmp_path).tokenization == "joined"


def test_an_hf_export_records_the_mode_and_loads_it_back(saved_dir: Path, tmp_path: Path):
    exported = export_hf(str(saved_dir), tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())[TOKENIZATION_KEY] == "llava"
    assert load_hf_llava(exported).tokenization == "llava"
    joined = LlavaModel.from_pretrained(saved_dir)
    joined.tokenization = "joined"
    tokenizer = load_tokenizer_dir(str(saved_dir))
    assert load_hf_llava(export_hf(joined, tmp_path / "joined", tokenizer)).tokenization == "joined"


def test_an_hf_folder_that_records_no_mode_loads_as_the_references(saved_dir: Path, tmp_path: Path):
    # llava-hf's conversions of the official weights say nothing: the reference trained them ('llava').
    exported = export_hf(str(saved_dir), tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    del config[TOKENIZATION_KEY]
    (exported / "config.json").write_text(json.dumps(config))
    assert load_hf_llava(exported).tokenization == "llava"

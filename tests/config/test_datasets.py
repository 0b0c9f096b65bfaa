"""The dataset registry: ``data.dataset: NAME`` expands into sources under ``data.root``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llava_ray.config import ConfigError, dump_config, load_config
from llava_ray.config.datasets import dataset_registry
from llava_ray.data.sources import resolve_sources

REPO = Path(__file__).resolve().parents[2]


def test_registry_holds_llava_1_5_data_in_the_reference_layout():
    registry = dataset_registry()
    pretrain, mix, instruct = (
        registry["llava-pretrain-558k"],
        registry["llava-v1.5-mix665k"],
        registry["llava-instruct-150k"],
    )
    # scripts/v1_5/pretrain.sh and finetune.sh: --data_path / --image_folder under ./playground/data.
    assert [(f.path, f.image_root) for f in pretrain.files] == [
        ("LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/images")
    ]
    assert [(f.path, f.image_root) for f in mix.files] == [("llava_v1_5_mix665k.json", ".")]
    assert mix.images == [
        "coco/train2017",
        "gqa/images",
        "ocr_vqa/images",
        "textvqa/train_images",
        "vg/VG_100K",
        "vg/VG_100K_2",
    ]
    assert mix.samples == 665298 and instruct.files[0].image_root == "coco/train2017"


def test_docs_describe_every_registered_dataset():
    docs = (REPO / "docs/data.md").read_text()
    for name, entry in dataset_registry().items():
        assert f"`{name}`" in docs, f"docs/data.md does not describe {name}"
        for folder in entry.images:
            assert folder in docs, f"docs/data.md does not name {name}'s image folder {folder}"


def test_dataset_expands_before_explicit_sources_and_round_trips(tmp_path):
    config = load_config(
        None,
        [
            "data.dataset=llava-v1.5-mix665k",
            "data.root=s3://bucket/data",
            "data.sources=[{path: /data/extra.jsonl, weight: 0.5}]",
        ],
    )
    sources = [(s.name, s.path, s.image_root) for s in config.data.sources]
    assert sources == [
        ("llava-v1.5-mix665k", "s3://bucket/data/llava_v1_5_mix665k.json", "s3://bucket/data"),
        (None, "/data/extra.jsonl", None),
    ]
    # validate prints the expansion; the printed config loads back to the same sources (no second copy).
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped).data.sources == config.data.sources


def test_unknown_dataset_or_missing_root_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match=re.escape("unknown dataset 'llava-v15-mix665k' (did you mean 'llava-v1.5-mix665k'?)"),
    ):
        load_config(None, ["data.dataset=llava-v15-mix665k", "data.root=/data"])
    with pytest.raises(
        ConfigError, match=r"needs data.root, the folder or s3:// prefix laid out as LLaVA's playground/data"
    ):
        load_config(None, ["data.dataset=llava-pretrain-558k"])


def test_registered_dataset_resolves_to_readable_sources(tmp_path):
    """The expansion is what the data pipeline reads: the synthetic entry over a folder `llava-ray synth` wrote."""
    (tmp_path / "images").mkdir()
    sample = {"id": "0", "image": "images/a.png", "conversations": [{"from": "human", "value": "<image>"}]}
    for stem in ("stage1", "stage2"):
        (tmp_path / f"{stem}.json").write_text(json.dumps([sample]))
    config = load_config(None, [f"data.root={tmp_path}", "data.dataset=[synthetic-stage1, synthetic-stage2]"])
    sources = resolve_sources(config.data)
    assert [(s.name, s.path, s.image_root, s.format) for s in sources] == [
        ("synthetic-stage1", f"{tmp_path}/stage1.json", str(tmp_path), "array"),
        ("synthetic-stage2", f"{tmp_path}/stage2.json", str(tmp_path), "array"),
    ]

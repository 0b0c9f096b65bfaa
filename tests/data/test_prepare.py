"""The prepare pipeline on a real local Ray cluster: synthetic stages, every bad input, mixing, round trips.

Each pipeline run takes a few seconds (actor start-up dominates), so runs are shared by
module-scoped fixtures; parsing and mixing rules are also tested without Ray.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llava_ray.config import ConfigError, LlavaRayConfig
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.data import sources as sources_module
from llava_ray.data.images import transform_image
from llava_ray.data.prepare import (
    REPORT_FILE,
    build_prepare_pipeline,
    decode_prepared_row,
    load_report,
    read_prepared,
    remove_leftovers,
    run_prepare,
    swap_by_renames,
    swap_folders,
)
from llava_ray.data.report import (
    ReportBuilder,
    ReportImbalanceError,
    Skip,
    Written,
    finish_report,
    format_summary,
    length_bucket,
)
from llava_ray.data.samples import PREPARED_SCHEMA, PreparedSample, SamplePreparer
from llava_ray.data.sources import (
    DataPathError,
    SourceScanner,
    copies_for,
    iter_records,
    resolve_sources,
)
from llava_ray.data.synthetic import generate

SAMPLES = 40
TEXT_ONLY = 4  # synthetic stage 2 adds 10% text-only samples
MakeConfig = Callable[..., LlavaRayConfig]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, samples=SAMPLES, eval_samples=5, seed=0)
    return root


@pytest.fixture(scope="module")
def stage1(
    ray_cluster: None, synthetic: Path, make_config: MakeConfig, tmp_path_factory
) -> tuple[LlavaRayConfig, dict]:
    """Stage 1 (plain template) prepared with JPEG storage."""
    out = tmp_path_factory.mktemp("stage1") / "prepared"
    config = make_config(
        [{"path": str(synthetic / "stage1.json")}], out, template="plain", image_format="jpeg"
    )
    return config, run_prepare(config)


@pytest.fixture(scope="module")
def stage2(
    ray_cluster: None, synthetic: Path, make_config: MakeConfig, tmp_path_factory
) -> tuple[LlavaRayConfig, dict]:
    """Stage 2 (vicuna_v1, image and text-only samples) prepared with PNG storage."""
    out = tmp_path_factory.mktemp("stage2") / "prepared"
    config = make_config([{"path": str(synthetic / "stage2.json")}], out)
    return config, run_prepare(config)


def shard_rows(path: str | Path) -> list[dict[str, Any]]:
    """The shards' rows, read with pyarrow (read_prepared is tested once; it costs a Ray Data job)."""
    return pa.concat_tables(
        [pq.read_table(shard) for shard in sorted(Path(path).glob("*.parquet"))]
    ).to_pylist()


def load_samples(path: Path) -> dict[str, dict[str, Any]]:
    return {sample["id"]: sample for sample in json.loads(path.read_text())}


# --- synthetic stages ------------------------------------------------------------------------


def test_stage1_plain_writes_every_caption(stage1: tuple[LlavaRayConfig, dict]) -> None:
    config, report = stage1
    assert (report["input"], report["written"], report["skipped"]) == (SAMPLES, SAMPLES, {})
    assert report["template"] == "plain" and report["image_format"] == "jpeg"
    assert report["sources"]["stage1.json"] == {
        "records": SAMPLES,
        "sampled_out": 0,
        "input": SAMPLES,
        "written": SAMPLES,
        "skipped": {},
        "changed": {},
    }
    out = Path(config.data.prepared_path)
    assert json.loads((out / REPORT_FILE).read_text()) == report == load_report(str(out))
    assert report["shards"] == len(list(out.glob("*.parquet"))) >= 1
    dataset = read_prepared(str(out))
    assert dataset.schema().base_schema == PREPARED_SCHEMA
    rows = dataset.take_all()
    assert len(rows) == SAMPLES and {row["modality"] for row in rows} == {"image"}
    for row in rows:
        input_ids, labels = list(row["input_ids"]), list(row["labels"])
        assert row["length"] == len(input_ids) == len(labels) <= 256
        assert row["num_supervised"] == sum(label != IGNORE_INDEX for label in labels) > 0
        assert len(row["images"]) == 1 and bytes(row["images"][0])[:3] == b"\xff\xd8\xff"
        # plain: <s>, 16 image positions, then the caption (supervised) and "\n".
        assert labels[: 1 + 16] == [IGNORE_INDEX] * 17 and labels[-1] != IGNORE_INDEX
    assert sum(report["length_histogram"].values()) == SAMPLES
    assert report["samples_per_s"] > 0 and report["elapsed_s"] > 0


def test_stage2_vicuna_keeps_text_only_samples(stage2: tuple[LlavaRayConfig, dict], synthetic: Path) -> None:
    config, report = stage2
    total = SAMPLES + TEXT_ONLY
    assert (report["input"], report["written"], report["skipped"]) == (total, total, {})
    assert report["input"] == report["written"] + sum(report["skipped"].values())
    rows = shard_rows(config.data.prepared_path)
    assert {row["id"] for row in rows} == set(load_samples(synthetic / "stage2.json"))
    modality = Counter(row["modality"] for row in rows)
    assert modality == {"image": SAMPLES, "text": TEXT_ONLY}
    for row in rows:
        assert len(row["images"]) == (1 if row["modality"] == "image" else 0)
    histogram = Counter()
    for row in rows:
        low, high = length_bucket(row["length"])
        histogram[f"{low}-{high}"] += 1
    assert report["length_histogram"] == dict(histogram)


def test_png_rows_decode_to_what_preparing_in_process_gives(stage2, synthetic: Path, prepare_records) -> None:
    config, _ = stage2
    samples = load_samples(synthetic / "stage2.json")
    preparer = SamplePreparer.from_config(config)
    for row in shard_rows(config.data.prepared_path):
        input_ids, labels, images = decode_prepared_row(row)
        (expected,) = prepare_records(preparer, [samples[row["id"]]])
        assert isinstance(expected, PreparedSample)
        assert (input_ids, labels) == (expected.input_ids, expected.labels), row["id"]
        assert row["num_supervised"] == expected.num_supervised and row["length"] == expected.length
        assert len(images) == len(expected.images)
        for image, data in zip(images, expected.images, strict=True):
            assert image.mode == "RGB" and image.size == (64, 64)
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_jpeg_rows_match_the_processed_source_image(stage1, synthetic: Path, prepare_records) -> None:
    config, _ = stage1
    samples = load_samples(synthetic / "stage1.json")
    preparer = SamplePreparer.from_config(config)
    for row in shard_rows(config.data.prepared_path):
        input_ids, labels, (image,) = decode_prepared_row(row)
        (expected,) = prepare_records(preparer, [samples[row["id"]]])
        assert isinstance(expected, PreparedSample)
        assert (input_ids, labels) == (expected.input_ids, expected.labels)
        assert bytes(row["images"][0]) == expected.images[0]  # the same encoder on the same pixels
        processed = transform_image(
            Image.open(synthetic / samples[row["id"]]["image"]), preparer.settings.image
        )
        difference = np.abs(np.asarray(image, dtype=np.int32) - np.asarray(processed, dtype=np.int32))
        assert difference.mean() < 3.0, row["id"]  # JPEG's loss at quality 95 around the shapes' edges


def test_streaming_dataset_yields_the_rows_without_shards(ray_cluster, synthetic: Path, make_config) -> None:
    config = make_config([{"path": str(synthetic / "stage2.json")}], prepare_workers=1)
    pipeline = build_prepare_pipeline(config)
    rows = pipeline.dataset.take_all()
    assert {row["id"] for row in rows} == set(load_samples(synthetic / "stage2.json"))
    report = pipeline.finish(elapsed_s=1.0)
    assert (report["input"], report["written"]) == (len(rows), len(rows))
    assert report["workers"] == 1  # data.prepare_workers, not the session cluster's 2 CPUs


# --- every kind of bad input -----------------------------------------------------------------

FILLER = "What shape is shown?"
# A good image sample is about 57 positions with the tiny tokenizer (16 of them the image); 120 cuts
# 'answer-truncated-away' before its answer and 'cut-inside-image' inside its image.
MAX_LENGTH = 120


def turns(*texts: str) -> list[dict[str, str]]:
    return [{"from": "human" if index % 2 == 0 else "gpt", "value": text} for index, text in enumerate(texts)]


def image_sample(sample_id: str, image: Any = "good.png", question: str = "<image>\nWhat color?") -> dict:
    return {"id": sample_id, "image": image, "conversations": turns(question, "red")}


def write_images(root: Path) -> None:
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (96, 64), (200, 40, 40)).save(images / "good.png")
    Image.new("RGB", (200, 200), (40, 40, 200)).save(images / "big.png")  # 40,000 px > the 30,000 limit
    Image.new("RGB", (32, 32)).save(root / "outside.png")  # exists, but outside the image root
    buffer = io.BytesIO()
    Image.new("RGB", (90, 60), (10, 200, 10)).save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not really a JPEG")
    (images / "empty.png").write_bytes(b"")


def bad_lines(root: Path) -> list[bytes | dict | list | str]:
    """JSON lines records: good samples and one record per bad-input kind (line numbers matter)."""
    return [
        image_sample("good-1"),  # line 1
        {"id": "good-2", "conversations": turns("What is 2 plus 2?", "4")},
        image_sample("good-3", "sub/../good.png"),  # normalises to a path inside the root
        image_sample("missing", "nope.png"),
        image_sample("empty", "empty.png"),
        image_sample("truncated", "truncated.jpg"),
        image_sample("corrupt", "corrupt.jpg"),
        image_sample("too-large", "big.png"),
        image_sample("escape-dotdot", "../outside.png"),
        image_sample("escape-absolute", str(root / "outside.png")),  # line 10
        image_sample("no-placeholder", question="What color?"),
        image_sample("two-placeholders", question="<image>\nWhat color? <image>"),
        {"id": "text-with-placeholder", "conversations": turns("<image>\nWhat color?", "red")},
        {  # trained as the reference does: the opening answer dropped, <image> moved to the front
            "id": "starts-with-gpt",
            "image": "good.png",
            "conversations": [{"from": "gpt", "value": "Hi"}, *turns("What color?\n<image>", "red")],
        },
        {
            "id": "human-human",
            "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
        },
        {"id": "empty-turn", "conversations": turns("What is 1 plus 1?", "   ")},
        '{"id": "broken", "conversations": [',  # line 17: malformed JSON
        b'{"id": "latin-1", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "ok"}]}',
        '{"id": "escaped-surrogate", "conversations": [{"from": "human", "value": "\\udc80?"}, '
        '{"from": "gpt", "value": "ok"}]}',
        image_sample("good-1", "big.png"),  # line 20: duplicate id (the first record keeps it)
        {"conversations": turns("Hi?", "Hello.")},
        {"id": "", "conversations": turns("Hi?", "Hello.")},
        {"id": "no-conversations"},
        {"id": "conversations-not-a-list", "conversations": "Hi?"},
        {"id": "image-not-a-path", "image": 5, "conversations": turns("<image>\nHi?", "Hello.")},
        [1, 2],  # not an object
        image_sample("answer-truncated-away", question="<image>\n" + " ".join([FILLER] * 12)),
        {
            "id": "cut-inside-image",
            "image": "good.png",
            "conversations": turns("What color?", "red", " ".join([FILLER] * 10), "ok", "<image>", "blue"),
        },
        {
            "id": "image-cut-away",
            "image": "good.png",
            "conversations": turns("What color?", "red", " ".join([FILLER] * 20), "ok", "<image>", "blue"),
        },
        image_sample("two-images-one-turn", ["good.png", "good.png"], "<image>\n<image>\nSame?"),  # line 30
        {"id": "no-answer", "conversations": turns("Hello?")},
        {
            "id": "unknown-role",
            "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}],
        },
        "",  # a blank line is not a record
    ]


EXPECTED_SKIPS = {
    "missing_image": 1,
    "empty_image_file": 1,
    "truncated_image": 1,
    "corrupt_image": 1,
    "image_too_large": 1,
    "image_path_outside_root": 2,
    "image_count_mismatch": 2,
    "image_token_in_text_only": 1,
    "roles_not_alternating": 1,
    "empty_turn": 1,
    "malformed_json": 1,
    "non_utf8": 3,
    "duplicate_id": 2,
    "missing_id": 1,
    "invalid_id": 1,
    "missing_conversations": 1,
    "invalid_conversations": 1,
    "invalid_image_field": 1,
    "invalid_record": 2,
    "no_supervised_tokens": 1,
    "truncated_inside_image": 1,
    "image_truncated_away": 1,
    "template_image_mismatch": 1,
    "no_answer": 1,
    "malformed_turn": 1,
}
GOOD_IDS = {"good-1", "good-2", "good-3", "starts-with-gpt", "array-good"}


def encode_line(entry: bytes | dict | list | str) -> bytes:
    if isinstance(entry, bytes):
        return entry
    return (entry if isinstance(entry, str) else json.dumps(entry)).encode()


def write_bad_corpus(root: Path) -> list[dict[str, Any]]:
    """A JSON lines source (image root: images/) and a JSON array source (image root: its folder)."""
    write_images(root)
    (root / "bad.jsonl").write_bytes(b"\n".join(encode_line(entry) for entry in bad_lines(root)) + b"\n")
    array = [
        image_sample("array-good", "images/good.png"),
        "not an object",
        {"id": "good-2", "conversations": turns("Duplicate across sources?", "yes")},
    ]
    raw_array = json.dumps(array, indent=1).encode()
    latin = b'{"id": "array-latin-1", "conversations": [{"from": "human", "value": "\xe9"}, {"from": "gpt", "value": "x"}]}'
    (root / "bad.json").write_bytes(raw_array[:-1].rstrip() + b",\n " + latin + b"\n]")
    return [
        {"path": str(root / "bad.jsonl"), "image_root": str(root / "images")},
        {"path": str(root / "bad.json")},
    ]


@pytest.fixture(scope="module")
def bad_run(ray_cluster, make_config: MakeConfig, tmp_path_factory) -> tuple[LlavaRayConfig, dict]:
    root = tmp_path_factory.mktemp("bad")
    out = root / "prepared"
    out.mkdir()  # a previous run's output, which prepare replaces
    (out / "old-shard.parquet").write_bytes(b"stale")
    (out / REPORT_FILE).write_text("{}")
    config = make_config(write_bad_corpus(root), out, model_max_length=MAX_LENGTH, max_image_pixels=30_000)
    return config, run_prepare(config)


def test_every_bad_input_is_skipped_with_its_own_reason(bad_run) -> None:
    _, report = bad_run
    assert report["skipped"] == EXPECTED_SKIPS
    assert report["written"] == len(GOOD_IDS)
    assert (
        report["input"]
        == report["written"] + sum(report["skipped"].values())
        == len(GOOD_IDS) + sum(EXPECTED_SKIPS.values())
    )
    lines, array = report["sources"]["bad.jsonl"], report["sources"]["bad.json"]
    assert (lines["records"], lines["written"], array["records"], array["written"]) == (32, 4, 4, 1)
    changes = {"leading_answer_dropped": 1, "image_moved_to_front": 1}
    assert (report["changed"], lines["changed"], array["changed"]) == (changes, changes, {})
    assert report["changed_examples"] == {change: ["starts-with-gpt"] for change in changes}
    assert array["skipped"] == {"invalid_record": 1, "duplicate_id": 1, "non_utf8": 1}


def test_good_samples_are_all_written_and_stale_output_is_gone(bad_run) -> None:
    config, report = bad_run
    out = Path(config.data.prepared_path)
    assert not (out / "old-shard.parquet").exists()
    rows = shard_rows(out)
    assert sorted(row["id"] for row in rows) == sorted(GOOD_IDS)
    assert {row["id"]: row["source"] for row in rows}["array-good"] == "bad.json"
    assert report["shards"] == len(list(out.glob("*.parquet")))


def test_skip_examples_name_samples_or_file_locations(bad_run) -> None:
    examples = bad_run[1]["examples"]
    assert set(examples) == set(EXPECTED_SKIPS)
    assert examples["missing_image"] == ["missing"]
    assert sorted(examples["image_path_outside_root"]) == ["escape-absolute", "escape-dotdot"]
    assert examples["malformed_json"] == ["bad.jsonl:17"]
    assert sorted(examples["non_utf8"]) == ["bad.json[3]", "bad.jsonl:18", "bad.jsonl:19"]
    assert sorted(examples["duplicate_id"]) == ["bad.json[2]", "bad.jsonl:20"]
    assert sorted(examples["invalid_record"]) == ["bad.json[1]", "bad.jsonl:26"]
    assert examples["truncated_inside_image"] == ["cut-inside-image"]


def test_in_process_preparation_gives_the_same_reasons(bad_run, prepare_records) -> None:
    config, _ = bad_run
    preparer = SamplePreparer.from_config(config)
    outcome, good = prepare_records(preparer, [image_sample("x", "nope.png"), image_sample("y")])
    assert isinstance(outcome, Skip) and (outcome.reason, outcome.example) == ("missing_image", "x")
    assert isinstance(good, PreparedSample) and good.modality == "image" and len(good.images) == 1


def test_nothing_usable_still_reports_and_reads_back_empty(ray_cluster, tmp_path: Path, make_config) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "conversations": [\n{"no": "id"}\n')
    report = run_prepare(make_config([{"path": str(path)}], tmp_path / "out"))
    assert (report["input"], report["written"], report["shards"]) == (2, 0, 0)
    assert report["skipped"] == {"malformed_json": 1, "missing_id": 1}
    dataset = read_prepared(str(tmp_path / "out"))
    assert dataset.count() == 0 and dataset.schema().base_schema == PREPARED_SCHEMA


# --- mixing: weight and repeat ---------------------------------------------------------------


def write_prefixed(synthetic: Path, out: Path, prefix: str, count: int) -> Path:
    """Stage-1 samples as JSON lines, ids prefixed so that sources do not share ids."""
    samples = json.loads((synthetic / "stage1.json").read_text())[:count]
    out.write_text("".join(json.dumps({**s, "id": f"{prefix}-{s['id']}"}) + "\n" for s in samples))
    return out


@pytest.fixture(scope="module")
def mixed(
    ray_cluster, synthetic: Path, make_config: MakeConfig, tmp_path_factory
) -> tuple[LlavaRayConfig, dict]:
    root = tmp_path_factory.mktemp("mix")
    sources = [
        {
            "path": str(write_prefixed(synthetic, root / "a.jsonl", "a", SAMPLES)),
            "image_root": str(synthetic),
            "repeat": 2,
        },
        {
            "path": str(write_prefixed(synthetic, root / "b.jsonl", "b", SAMPLES)),
            "image_root": str(synthetic),
            "weight": 0.5,
        },
        {
            "path": str(write_prefixed(synthetic, root / "c.jsonl", "c", 10)),
            "image_root": str(synthetic),
            "weight": 2.5,
        },
    ]
    config = make_config(sources, root / "prepared", template="plain", seed=7)
    return config, run_prepare(config)


def test_repeat_and_weight_set_the_copies(mixed) -> None:
    config, report = mixed
    rows = shard_rows(config.data.prepared_path)
    copies = Counter(row["id"] for row in rows)
    assert len({row["row"] for row in rows}) == len(rows)  # copies of a sample have distinct row keys
    _, b, c = resolve_sources(config.data)
    assert all(copies[f"a-train-{i:06d}"] == 2 for i in range(SAMPLES))
    kept_b = {sample_id for sample_id in copies if sample_id.startswith("b-")}
    assert 0.3 * SAMPLES <= len(kept_b) <= 0.7 * SAMPLES  # about half
    for i in range(SAMPLES):
        assert copies[f"b-train-{i:06d}"] == copies_for(b, f"b-train-{i:06d}", seed=7) in (0, 1)
    for i in range(10):
        assert copies[f"c-train-{i:06d}"] == copies_for(c, f"c-train-{i:06d}", seed=7) in (2, 3)
    assert report["sources"]["a.jsonl"]["input"] == report["sources"]["a.jsonl"]["written"] == 2 * SAMPLES
    assert report["sources"]["b.jsonl"]["written"] == len(kept_b)
    assert report["sources"]["b.jsonl"]["sampled_out"] == SAMPLES - len(kept_b)
    assert report["written"] == sum(copies.values())


def test_weight_sampling_is_fixed_by_the_seed(
    synthetic: Path, tmp_path: Path, make_config: MakeConfig
) -> None:
    path = write_prefixed(synthetic, tmp_path / "b.jsonl", "b", SAMPLES)

    def kept(seed: int, weight: float) -> list[int]:
        config = make_config([{"path": str(path), "weight": weight}], seed=seed)
        scanner = SourceScanner(resolve_sources(config.data), seed)
        return [item.copies for item in scanner.scan()]

    assert kept(7, 0.5) == kept(7, 0.5)
    assert kept(7, 0.5) != kept(8, 0.5)
    assert sum(kept(7, 2.5)) in range(2 * SAMPLES, 3 * SAMPLES + 1)
    ids = [f"id-{i}" for i in range(4000)]
    source = resolve_sources(make_config([{"path": str(path), "weight": 0.25}]).data)[0]
    assert sum(copies_for(source, sample_id, seed=0) for sample_id in ids) == pytest.approx(1000, abs=100)


# --- the report (no Ray) --------------------------------------------------------------------


def test_report_counts_each_row_once_and_must_balance() -> None:
    builder = ReportBuilder(["a.jsonl", "b.json"])
    skips = [Skip(0, 0, "missing_image", "s0", 2), Skip(1, 1, "malformed_json", "b.json[1]")]
    written = [Written(2, 0, 100, 2), Written(3, 1, 300, 1)]
    builder.add(skips, written)
    builder.add(skips[:1], written[:1])  # a retried batch: nothing counted twice
    counts = builder.counts()
    assert counts["written"] == 3 and counts["skipped"] == {"missing_image": 2, "malformed_json": 1}
    assert counts["examples"] == {"missing_image": ["s0"], "malformed_json": ["b.json[1]"]}
    assert counts["length_histogram"] == {"65-128": 2, "257-512": 1}
    expected = {
        "a.jsonl": {"records": 2, "sampled_out": 0, "input": 4},
        "b.json": {"records": 2, "sampled_out": 0, "input": 2},
    }
    report = finish_report(counts, expected, elapsed_s=2.0, settings={"template": "plain"})
    assert (report["input"], report["samples_per_s"]) == (6, 3.0)
    assert format_summary(report) == (
        "prepare: 6 samples in, 3 written, 3 skipped (missing_image 2, malformed_json 1); 3.0 samples/s over 2.0 s"
    )
    expected["b.json"]["input"] = 3  # one sample the workers never accounted for
    with pytest.raises(
        ReportImbalanceError, match=r"samples vanished .*b.json: input 3 != written 1 \+ skipped 1"
    ):
        finish_report(counts, expected, elapsed_s=2.0, settings={})


# --- reading sources (no Ray) ----------------------------------------------------------------


def test_json_array_reader_survives_every_chunk_boundary(tmp_path: Path, make_config, monkeypatch) -> None:
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": 'tricky "], [{" text'}]},
        12345678,
        {"id": "ünïcødé ✓", "nested": [[1, 2], {"x": None}], "conversations": []},
        True,
        -0.5e10,
    ]
    path = tmp_path / "tricky.json"
    path.write_text(
        "\ufeff  [\n" + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in records) + "  ]\n"
    )
    source = resolve_sources(make_config([{"path": str(path)}]).data)[0]
    for chunk in (1, 2, 3, 5, 8, 1 << 20):
        monkeypatch.setattr(sources_module, "_READ_CHARS", chunk)
        assert [record.value for record in iter_records(source)] == records, chunk


def test_compressed_json_lines_and_blank_lines(tmp_path: Path, make_config) -> None:
    path = tmp_path / "samples.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": 1}\n\n  \n{"id": 2}\n'))
    source = resolve_sources(make_config([{"path": str(path)}]).data)[0]
    assert source.format == "lines"
    assert [(r.locator, r.value) for r in iter_records(source)] == [
        ("samples.jsonl.gz:1", {"id": 1}),
        ("samples.jsonl.gz:4", {"id": 2}),
    ]


# --- failing fast ----------------------------------------------------------------------------


def test_unreadable_sources_fail_before_any_work_listing_every_problem(tmp_path: Path, make_config) -> None:
    (tmp_path / "notjson.json").write_text("id,conversations\n1,hello\n")
    (tmp_path / "empty.json").write_text("  \n")
    (tmp_path / "ok.jsonl").write_text('{"id": 1}\n')
    config = make_config(
        [
            {"path": str(tmp_path / "missing.json")},
            {"path": str(tmp_path / "notjson.json")},
            {"path": str(tmp_path / "empty.json")},
            {"path": str(tmp_path / "ok.jsonl"), "image_root": str(tmp_path / "no-images")},
            {"path": str(tmp_path)},
        ],
        tmp_path / "out",
    )
    with pytest.raises(ConfigError, match=r"\(5 problem\(s\)\)") as error:
        run_prepare(config)
    message = str(error.value)
    assert "data.sources.0.path = " in message and "missing.json': no such file" in message
    assert "data.sources.1.path" in message and "is not JSON (it starts with 'id,conversations" in message
    assert "data.sources.2.path" in message and "is empty; remove the source" in message
    assert "data.sources.3.image_root" in message and "no such folder" in message
    assert "data.sources.4.path" in message and "is a folder" in message
    assert not (tmp_path / "out").exists()


def test_json_array_syntax_error_names_the_line(tmp_path: Path, make_config) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"id": 1},\n {"id": 2,,}\n]\n')
    with pytest.raises(
        DataPathError, match=r"broken.json': not valid JSON at line 3 column 10 .*convert it to JSON lines"
    ):
        run_prepare(make_config([{"path": str(path)}], tmp_path / "out"))


def test_a_json_object_instead_of_samples_fails_fast_naming_the_format(tmp_path: Path, make_config) -> None:
    sample = {"id": "a", "conversations": turns("Hi?", "Hello.")}
    (tmp_path / "pretty.json").write_text(json.dumps({"data": [sample]}, indent=2))
    (tmp_path / "one-line.json").write_text(json.dumps({"info": "v1", "samples": [sample]}))
    (tmp_path / "by-id.json.gz").write_bytes(gzip.compress(json.dumps({"a": sample}).encode()))
    # Not objects: JSON lines whose first record is broken or not a sample stay per-record skips.
    (tmp_path / "broken-first.jsonl").write_text(
        '{"id": "a", "conversations": [\n' + json.dumps(sample) + "\n"
    )
    (tmp_path / "odd-first.jsonl").write_text('{"meta": [1, 2]}\n' + json.dumps(sample) + "\n")
    names = ["pretty.json", "one-line.json", "by-id.json.gz", "broken-first.jsonl", "odd-first.jsonl"]
    config = make_config([{"path": str(tmp_path / name)} for name in names], tmp_path / "out")
    with pytest.raises(DataPathError, match=r"\(3 problem\(s\)\)") as error:
        run_prepare(config)
    message = str(error.value)
    expected = "LLaVA data is a JSON array of samples .* or JSON lines \\(one sample object per line\\)"
    for index, what in enumerate(
        ["spread over several lines", "holding the samples under 'samples'", "mapping ids to samples"]
    ):
        assert re.search(
            f"data.sources.{index}.path = .*: is one JSON object {what}, .*; {expected}", message
        )
    assert "data.sources.3" not in message and "data.sources.4" not in message
    assert not (tmp_path / "out").exists()
    lines = resolve_sources(make_config([{"path": str(tmp_path / name)} for name in names[3:]]).data)
    assert [source.format for source in lines] == ["lines", "lines"]


def test_a_finished_run_takes_the_output_folder_in_one_swap(tmp_path: Path) -> None:
    """The local switch of prepare.publish: exchange (or the two-rename fallback), then the old one goes."""

    def folder(name: str, marker: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / REPORT_FILE).write_text(marker)
        return tmp_path / name

    output = folder("out", "old")
    swap_folders(folder("out.partial-1", "new"), output)
    assert (output / REPORT_FILE).read_text() == "new"
    replaced = [tmp_path / "out.partial-1", tmp_path / "out.old-1"]
    assert [(path / REPORT_FILE).read_text() for path in replaced if path.exists()] == ["old"]
    folder("out.partial-0", "killed run")
    remove_leftovers(output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]

    # Where the file system cannot exchange names: two renames, nothing lost in between.
    swap_by_renames(folder("out.partial-2", "newer"), output, tmp_path / "out.old-2")
    assert (output / REPORT_FILE).read_text() == "newer"
    assert (tmp_path / "out.old-2" / REPORT_FILE).read_text() == "new"
    remove_leftovers(output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_output_location_problems_fail_fast(tmp_path: Path, make_config, synthetic: Path) -> None:
    source = [{"path": str(synthetic / "stage1.json")}]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataPathError, match=r"holds files prepare did not write \(notes.txt\); use an empty"):
        run_prepare(make_config(source, tmp_path / "busy", template="plain"))
    with pytest.raises(ConfigError, match=r"data.prepared_path is not set"):
        run_prepare(make_config(source, None, template="plain"))
    with pytest.raises(FileNotFoundError, match=r"no report.json at .*prepare has not finished there"):
        read_prepared(str(tmp_path / "busy"))


def test_duplicate_source_names_must_be_told_apart(tmp_path: Path, make_config, synthetic: Path) -> None:
    (tmp_path / "x").mkdir()
    copy = tmp_path / "x" / "stage1.json"
    copy.write_text((synthetic / "stage1.json").read_text())
    config = make_config([{"path": str(synthetic / "stage1.json")}, {"path": str(copy)}], template="plain")
    with pytest.raises(
        DataPathError, match=r"report name 'stage1.json' is already used by data.sources.0; set"
    ):
        resolve_sources(config.data)

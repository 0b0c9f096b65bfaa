"""The generation job end to end: a real local Ray, a real HTTP chat server on loopback, real files.

Unit tests of the client, parser and journal come first (no Ray); then whole runs of
:func:`run_generate` against :class:`conftest.FakeChatServer`, with resume, a run that stops
mid-way, the local Hugging Face backend, and ``prepare`` reading the output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from llava_ray.config import ConfigError, validate_config
from llava_ray.config.generation import GenerateConfig
from llava_ray.endpoints.client import ChatClient, ClientSettings, EndpointError, RequestFailed, TokenBucket
from llava_ray.endpoints.journal import JOURNAL_SUFFIX, Journal, JournalError
from llava_ray.generation.context import build_context, load_coco
from llava_ray.generation.job import plan_pairs, run_generate
from llava_ray.generation.parse import detail_instruction, find_leak, parse_reply
from llava_ray.generation.prompting import USES_BOXES, build_messages, load_prompts
from llava_ray.utils.skips import Skipped

API_KEY = "sk-test-secret"  # conftest.API_KEY; conftest modules are not importable under importlib mode
TYPES = ("conversation", "detail", "complex")
REPO = Path(__file__).resolve().parents[2]

# Image id -> what the server does (conftest.BEHAVIOURS); unlisted images get good replies.
PLAN = {
    4: "malformed",
    5: "leaking",
    6: "empty",
    7: "rate_limited_once",
    8: "server_error",
    10: "same_conversation",
    11: "same_conversation",
    12: "truncated_detail",
}


@pytest.fixture(autouse=True)
def api_key_in_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def messages_for(coco_dir: Path, image_id: int, kind: str) -> list[dict[str, str]]:
    images = load_coco(str(coco_dir / "coco" / "instances.json"), str(coco_dir / "coco" / "captions.json"))
    image = next(image for image in images if image.image_id == image_id)
    return build_messages(load_prompts([kind])[kind], build_context(image, USES_BOXES[kind]))


def client_for(server, sleeps: list[float] | None = None, **settings) -> ChatClient:
    values = {"timeout_s": 1.0, "max_retries": 2, "backoff_initial_s": 0.01, **settings}
    config = ClientSettings(base_url=server.base_url, model="fake-gpt", api_key=API_KEY, **values)
    return ChatClient(config, sleep=sleeps.append if sleeps is not None else time.sleep)


def make_config(coco_dir: Path, server, output: Path, **overrides) -> GenerateConfig:
    values = {
        "annotations_path": str(coco_dir / "coco" / "instances.json"),
        "captions_path": str(coco_dir / "coco" / "captions.json"),
        "image_root": str(coco_dir / "images"),
        "output_path": str(output),
        "base_url": server.base_url if server is not None else None,
        "model": "fake-gpt",
        "max_retries": 2,
        "backoff_initial_s": 0.01,
        # Generous: on 2 busy cores a spurious timeout would add a retry the counts do not expect.
        # Timeouts are exercised by the client test.
        "request_timeout_s": 10.0,
        "max_concurrency": 4,
        "num_actors": 2,
        "requests_per_second": 100,
        **overrides,
    }
    return GenerateConfig(**values)


# --- client -------------------------------------------------------------------------------------


def test_client_retries_429_honouring_retry_after_and_timeouts(chat_server, coco_dir):
    chat_server.plan.update({7: "rate_limited_once", 9: "slow_once"})
    sleeps: list[float] = []
    client = client_for(chat_server, sleeps)
    completion = client.complete(messages_for(coco_dir, 7, "detail"))
    assert (completion.attempts, completion.finish_reason) == (2, "stop")
    assert sleeps == [0.0]  # Retry-After: 0 wins over the backoff
    completion = client.complete(messages_for(coco_dir, 9, "complex"))
    assert completion.attempts == 2 and completion.text.startswith("Question: Why might")
    assert chat_server.requests[(7, "detail")] == 2 and chat_server.requests[(9, "complex")] == 2
    assert chat_server.shape_errors == []


def test_client_gives_up_after_max_retries_with_the_status_and_backs_off_exponentially(chat_server, coco_dir):
    chat_server.plan[8] = "server_error"
    sleeps: list[float] = []
    with pytest.raises(RequestFailed, match=r"^HTTP 500 after 3 attempts$") as failure:
        client_for(chat_server, sleeps).complete(messages_for(coco_dir, 8, "conversation"))
    assert (failure.value.status, failure.value.attempts) == (500, 3)
    assert chat_server.requests[(8, "conversation")] == 3
    # Waits of 0.01 * 2**n, half fixed and half random.
    assert 0.005 <= sleeps[0] <= 0.01 and 0.01 <= sleeps[1] <= 0.02


def test_client_does_not_retry_a_bad_request_and_stops_on_a_refused_key(chat_server, coco_dir):
    client = client_for(chat_server)
    with pytest.raises(RequestFailed, match="HTTP 400: the first message") as failure:
        client.complete([{"role": "user", "content": "hello"}])
    assert failure.value.attempts == 1 and len(chat_server.shape_errors) == 1
    chat_server.plan[2] = "unauthorized"
    with pytest.raises(EndpointError, match=r"HTTP 401 .*check generate.base_url.*OPENAI_API_KEY") as error:
        client.complete(messages_for(coco_dir, 2, "detail"))
    assert API_KEY not in str(error.value)
    assert API_KEY not in repr(client.settings)


def test_client_reports_connection_errors_after_retries():
    settings = ClientSettings(base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, backoff_initial_s=0)
    with pytest.raises(RequestFailed, match=r"^connection error .* after 2 attempts$"):
        ChatClient(settings).complete([{"role": "user", "content": "hi"}])


def test_token_bucket_limits_the_rate():
    bucket = TokenBucket(rate=20, burst=1)
    started = time.monotonic()
    for _ in range(6):
        bucket.acquire()
    assert time.monotonic() - started >= 5 / 20 - 0.01


# --- parser and journal -------------------------------------------------------------------------


def test_question_answer_parsing_tolerates_markup_and_multiline_answers():
    reply = (
        "Sure, here is the conversation.\n\n**Question 1:** What is it?\n**Answer 1:** A dog.\n"
        "It is brown.\n- Question: Where is it?\nanswer: On the grass."
    )
    assert parse_reply("conversation", reply) == [
        ("What is it?", "A dog.\nIt is brown."),
        ("Where is it?", "On the grass."),
    ]
    assert parse_reply("detail", "  A dog runs.\n\nIt is happy. ") == [("", "A dog runs.\n\nIt is happy.")]


@pytest.mark.parametrize(
    ("kind", "reply", "finish_reason", "reason"),
    [
        ("conversation", " \n", "stop", "empty_reply"),
        ("detail", None, "stop", "empty_reply"),
        ("detail", "A long text that was cut", "length", "truncated"),
        ("conversation", "A dog on the grass.", "stop", "unparsable"),
        ("conversation", "Question: Why?\nQuestion: How?\nAnswer: So.", "stop", "unparsable"),
        ("conversation", "Question: Why?\nAnswer:", "stop", "unparsable"),
        ("conversation", "Question: Why?", "stop", "unparsable"),
        ("complex", "Question: A?\nAnswer: B.\nQuestion: C?\nAnswer: D.", "stop", "unparsable"),
        ("detail", "<image>\nA dog.", "stop", "unparsable"),
        ("detail", "As the captions say, a dog.", "stop", "leaking"),
        ("detail", "The bounding boxes show two dogs.", "stop", "leaking"),
        ("complex", "Question: Where?\nAnswer: At coordinates near the top.", "stop", "leaking"),
        ("detail", "The dog is at [0.123, 0.2, 0.5, 0.6].", "stop", "leaking"),
        ("detail", "The dog spans 0.481 of the width.", "stop", "leaking"),
        ("detail", "Based on the description, a dog.", "stop", "leaking"),
    ],
)
def test_replies_are_rejected_with_a_reason(kind, reply, finish_reason, reason):
    with pytest.raises(Skipped) as rejected:
        parse_reply(kind, reply, finish_reason)
    assert rejected.value.reason == reason


def test_ordinary_text_does_not_count_as_leaking():
    for text in ("A box of donuts sits on a table.", "The bus number is 1024.", "It costs 0.5 dollars."):
        assert find_leak(text) is None, text


def test_detail_instruction_is_seeded_per_sample():
    instructions = load_prompts(["detail"])["detail"].instructions
    chosen = {detail_instruction(instructions, 0, f"{i}-detail") for i in range(40)}
    assert len(chosen) > 3 and chosen <= set(instructions)
    assert detail_instruction(instructions, 0, "5-detail") == detail_instruction(instructions, 0, "5-detail")


def test_journal_cuts_a_torn_last_line_and_refuses_a_damaged_middle(tmp_path):
    journal = Journal(tmp_path / "out.json.partial.jsonl")
    assert journal.load() == {}
    with journal.appender() as append:
        append({"id": "1-detail", "reply": "A dog."})
        append({"id": "2-detail", "error": "request_failed", "detail": "HTTP 500"})
    with journal.path.open("a") as handle:
        handle.write('{"id": "3-detail", "rep')  # a crash mid-write
    assert set(journal.load()) == {"1-detail", "2-detail"}
    assert journal.path.read_text().endswith('"HTTP 500"}\n')
    with journal.path.open("a") as handle:
        handle.write('{"id": "3-detail", "reply": "x"}')  # complete but for its newline
    assert set(journal.load()) == {"1-detail", "2-detail", "3-detail"}
    with journal.appender() as append:
        append({"id": "1-detail", "reply": "A cat."})  # later lines win
    assert journal.load()["1-detail"]["reply"] == "A cat."
    journal.path.write_text('{"id": "1-detail"}\nnot json\n{"id": "2-detail"}\n')
    with pytest.raises(JournalError, match="line 2 is damaged"):
        journal.load()


# --- config -------------------------------------------------------------------------------------


def test_config_section_rejects_unknown_keys_and_hides_the_key():
    with pytest.raises(ValidationError, match=r"extra_forbidden|Extra inputs"):
        GenerateConfig(modle="x")
    with pytest.raises(ValidationError, match="each response type may appear once"):
        GenerateConfig(types=["detail", "detail"])
    with pytest.raises(ValidationError, match="use an http:// or https:// URL"):
        GenerateConfig(base_url="localhost:8000")
    config = GenerateConfig(api_key="sk-very-secret")
    assert "sk-very-secret" not in config.model_dump_json() + repr(config) + str(config.model_dump())
    for name, field in GenerateConfig.model_fields.items():
        assert field.description, name


def test_root_config_carries_the_section_with_did_you_mean_hints(tmp_path):
    from llava_ray.config import load_config

    config_file = tmp_path / "gen.yaml"
    config_file.write_text("generate:\n  model: m\n  types: [detail]\n")
    config = load_config(config_file, ["generate.limit=3"])
    assert isinstance(config.generate, GenerateConfig)
    assert (config.generate.model, config.generate.types, config.generate.limit) == ("m", ["detail"], 3)
    with pytest.raises(ConfigError, match=r"generate.modle: unknown key. Did you mean 'model'\?"):
        load_config(config_file, ["generate.modle=x"])


def test_every_problem_is_reported_before_any_request(tmp_path):
    with pytest.raises(ConfigError) as error:
        run_generate(GenerateConfig(image_root=str(tmp_path / "nowhere")))
    message = str(error.value)
    for expected in (
        "generate.annotations_path is not set",
        "generate.captions_path is not set",
        "generate.output_path is not set",
        "generate.model is not set",
        "is not a folder; point it at the images",
    ):
        assert expected in message
    with pytest.raises(ConfigError, match=r"output_path = 's3://b/x.json' is remote.*needs a local file"):
        run_generate(GenerateConfig(backend="hf", hf_model="m", output_path="s3://b/x.json"))
    with pytest.raises(ConfigError, match=r"does not exist; point the config at a COCO"):
        run_generate(
            GenerateConfig(
                annotations_path=str(tmp_path / "i.json"),
                captions_path=str(tmp_path / "c.json"),
                output_path=str(tmp_path / "o.json"),
                model="m",
            )
        )


def test_job_script_exits_2_on_a_bad_config(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("generat: {limit: 3}\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "generate_data.py"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "generat: unknown key" in result.stderr


# --- whole runs ---------------------------------------------------------------------------------


def read_output(path: Path) -> dict[str, dict]:
    samples = json.loads(path.read_text())
    assert isinstance(samples, list)
    return {sample["id"]: sample for sample in samples}


def test_generate_writes_llava_json_counts_every_skip_and_resumes(
    ray_session, chat_server, coco_dir, tmp_path
):
    chat_server.plan.update(PLAN)
    output = tmp_path / "out" / "llava_instruct.json"
    config = make_config(coco_dir, chat_server, output)
    report = run_generate(config, seed=0)

    assert chat_server.shape_errors == []
    assert report["input"] == 36 == report["written"] + sum(report["skipped"].values())
    assert report["written"] == 23
    assert report["skipped"] == {
        "leaking": 3,
        "empty_reply": 3,
        "request_failed": 3,
        "unparsable": 2,
        "duplicate": 1,
        "truncated": 1,
    }
    assert report["by_type"]["detail"] == {
        "input": 12,
        "written": 8,
        "skipped": {"leaking": 1, "empty_reply": 1, "request_failed": 1, "truncated": 1},
    }
    assert report["examples"]["request_failed"] == [f"8-{kind}: HTTP 500 after 3 attempts" for kind in TYPES]
    assert report["examples"]["duplicate"] == ["11-conversation: same as 10-conversation"]
    assert report["examples"]["unparsable"] == [
        "4-conversation: no Question:/Answer: lines",
        "4-complex: no Question:/Answer: lines",
    ]
    assert json.loads((output.parent / "report.json").read_text()) == report

    # Server side: retries happened where they should, and only there; the budget held.
    for kind in TYPES:
        assert chat_server.requests[(7, kind)] == 2  # 429 once
        assert chat_server.requests[(8, kind)] == 3  # 500 on every attempt: 1 + max_retries
        assert chat_server.requests[(1, kind)] == 1
    assert sum(chat_server.requests.values()) == 36 + 3 + 6
    assert report["requests"] == {
        "this_run": 36,
        "from_journal": 0,
        "attempts_this_run": 45,
        "journal_unused": 0,
    }
    assert report["mix"] is None
    assert chat_server.max_in_flight <= config.max_concurrency

    samples = read_output(output)
    assert len(samples) == 23 and "8-detail" not in samples and "11-conversation" not in samples
    for sample in samples.values():
        image_id, kind = sample["id"].split("-")
        assert sample["image"] == f"train_{int(image_id) - 1:06d}.png"
        turns = sample["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in turn["value"] for turn in turns) == 1
    assert samples["1-conversation"]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat is in picture 1?"},
        {"from": "gpt", "value": "Flat shapes on a grey background."},
        {"from": "human", "value": "Do the shapes touch?"},
        {"from": "gpt", "value": "No, they stand apart\nfrom each other."},
    ]
    instruction = samples["1-detail"]["conversations"][0]["value"].removeprefix("<image>\n")
    assert instruction in load_prompts(["detail"])["detail"].instructions
    assert samples["4-detail"]["conversations"][1]["value"] == "Sure! The picture is nice and calm."
    assert len(json.loads(json.dumps(samples["1-complex"]["conversations"]))) == 2

    # A rerun asks for nothing and rebuilds the same output from the journal.
    first_output = output.read_text()
    chat_server.reset_counters()
    again = run_generate(config, seed=0)
    assert sum(chat_server.requests.values()) == 0 and again["requests"]["from_journal"] == 36
    assert output.read_text() == first_output

    # With retry_failed, only the failed pairs are asked again; the server has recovered.
    chat_server.plan[8] = "good"
    retried = run_generate(config.model_copy(update={"retry_failed": True}), seed=0)
    assert chat_server.requested() == {f"8-{kind}" for kind in TYPES}
    assert retried["written"] == 26 and "request_failed" not in retried["skipped"]
    assert retried["input"] == retried["written"] + sum(retried["skipped"].values())


def test_resume_requests_only_the_missing_pairs(ray_session, chat_server, coco_dir, tmp_path):
    output = tmp_path / "resume.json"
    first = run_generate(
        make_config(coco_dir, chat_server, output, limit=5, types=["conversation", "complex"])
    )
    assert first["input"] == first["written"] == 10
    assert chat_server.requested() == {
        f"{i}-{kind}" for i in range(1, 6) for kind in ("conversation", "complex")
    }
    with Path(f"{output}{JOURNAL_SUFFIX}").open("a") as journal:
        journal.write('{"id": "6-conversation", "reply": "Question: Wh')  # the crash hit mid-write

    chat_server.reset_counters()
    report = run_generate(make_config(coco_dir, chat_server, output))
    expected = {f"{i}-{kind}" for i in range(1, 13) for kind in TYPES} - {
        f"{i}-{kind}" for i in range(1, 6) for kind in ("conversation", "complex")
    }
    assert chat_server.requested() == expected and set(chat_server.requests.values()) == {1}
    assert report["requests"]["this_run"] == 26 and report["requests"]["from_journal"] == 10
    assert report["input"] == report["written"] == 36
    assert set(read_output(output)) == {f"{i}-{kind}" for i in range(1, 13) for kind in TYPES}


def test_a_run_stopped_mid_way_resumes_where_it_stopped(ray_session, chat_server, coco_dir, tmp_path):
    output = tmp_path / "stopped.json"
    config = make_config(coco_dir, chat_server, output, batch_size=1, max_concurrency=2)
    chat_server.unauthorized_after = 12  # the key is revoked mid-run: every later request gets 401
    with pytest.raises(ConfigError, match=r"HTTP 401 .*OPENAI_API_KEY.*rerun to resume"):
        run_generate(config)
    journaled = set(Journal(f"{output}{JOURNAL_SUFFIX}").load())
    assert 0 < len(journaled) <= 12 and not output.exists()

    chat_server.unauthorized_after = None
    chat_server.reset_counters()
    report = run_generate(config)
    everything = {f"{i}-{kind}" for i in range(1, 13) for kind in TYPES}
    assert chat_server.requested() == everything - journaled
    assert report["requests"]["from_journal"] == len(journaled)
    assert report["written"] == report["input"] == 36


def test_a_mix_asks_for_its_share_of_pairs_resumes_and_reuses_the_journal(
    ray_session, chat_server, coco_dir, tmp_path
):
    output = tmp_path / "mix.json"
    paper = {"conversation": 58, "detail": 23, "complex": 77}
    config = make_config(coco_dir, chat_server, output, mix=paper, pairs_per_image=1.5, batch_size=1)
    images = load_coco(str(coco_dir / "coco" / "instances.json"), str(coco_dir / "coco" / "captions.json"))
    assigned = {pair.sample_id for pair in plan_pairs(images, config, seed=0)[0]}
    per_image = Counter(int(sample_id.split("-")[0]) for sample_id in assigned)
    assert len(assigned) == 18 and set(per_image) == set(range(1, 13)) and set(per_image.values()) == {1, 2}

    chat_server.unauthorized_after = 9  # stopped mid-way
    with pytest.raises(ConfigError, match="rerun to resume"):
        run_generate(config, seed=0)
    journaled = set(Journal(f"{output}{JOURNAL_SUFFIX}").load())
    assert 0 < len(journaled) <= 9 and journaled <= assigned

    chat_server.unauthorized_after = None
    chat_server.reset_counters()
    report = run_generate(config, seed=0)  # the same assignment: only the rest is asked for
    assert chat_server.requested() == assigned - journaled and set(chat_server.requests.values()) == {1}
    assert report["mix"] == {
        "images": 12,
        "pairs_per_image": 1.5,
        "shares": {"conversation": 0.367089, "detail": 0.14557, "complex": 0.487342},
        "pairs": {"conversation": 6, "detail": 3, "complex": 9},
    }
    assert {kind: numbers["input"] for kind, numbers in report["by_type"].items()} == report["mix"]["pairs"]
    assert report["input"] == report["written"] == 18 and set(read_output(output)) == assigned
    assert report["requests"]["from_journal"] == len(journaled)
    assert json.loads((output.parent / "report.json").read_text())["mix"] == report["mix"]

    chat_server.reset_counters()
    again = run_generate(config, seed=0)
    assert sum(chat_server.requests.values()) == 0 and again["requests"]["from_journal"] == 18

    # Two pairs per image: 24 pairs, 9 / 3 / 12. Replies still assigned are reused, the rest stay unused.
    more = make_config(coco_dir, chat_server, output, mix=paper, pairs_per_image=2)
    now_assigned = {pair.sample_id for pair in plan_pairs(images, more, seed=0)[0]}
    chat_server.reset_counters()
    report = run_generate(more, seed=0)
    assert chat_server.requested() == now_assigned - assigned
    assert report["mix"]["pairs"] == {"conversation": 9, "detail": 3, "complex": 12}
    assert report["requests"]["from_journal"] == len(now_assigned & assigned)
    assert report["requests"]["journal_unused"] == len(assigned - now_assigned)
    assert set(read_output(output)) == now_assigned and report["written"] == 24


def test_missing_images_and_captions_are_skipped_before_any_request(
    ray_session, chat_server, coco_dir, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("train_000000.png", "train_000001.png"):
        (images / name).write_bytes((coco_dir / "images" / name).read_bytes())
    captions = json.loads((coco_dir / "coco" / "captions.json").read_text())
    captions["annotations"] = [a for a in captions["annotations"] if a["image_id"] != 2]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    config = make_config(
        coco_dir, chat_server, tmp_path / "o.json", image_root=str(images), limit=3, types=["detail"]
    )
    report = run_generate(config.model_copy(update={"captions_path": str(tmp_path / "captions.json")}))
    assert report["skipped"] == {"no_captions": 1, "image_missing": 1}
    assert report["examples"] == {
        "no_captions": ["2-detail: image 2 has no captions"],
        "image_missing": [f"3-detail: train_000002.png not under {images}"],
    }
    assert report["written"] == 1 and chat_server.requested() == {"1-detail"}


def test_output_feeds_prepare_unchanged(ray_session, chat_server, coco_dir, tmp_path):
    output = tmp_path / "gen" / "instruct.json"
    generated = run_generate(make_config(coco_dir, chat_server, output, limit=4))
    from llava_ray.data.prepare import run_prepare

    config = validate_config(
        {
            "model": {"preset": "tiny", "init": "random", "model_max_length": 512},
            "train": {"stage": "finetune", "global_batch_size": 8, "micro_batch_size": 8},
            "data": {
                "sources": [{"path": str(output), "image_root": str(coco_dir / "images")}],
                "prepared_path": str(tmp_path / "prepared"),
                "image_format": "png",
            },
        }
    )
    prepared = run_prepare(config, workers=1)
    assert prepared["written"] == generated["written"] == 12 and prepared["skipped"] == {}


def test_local_hf_backend_accounts_for_every_request(ray_session, coco_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llava_ray.config.presets import TINY_TOKENIZER_DIR

    model_dir = tmp_path / "tiny-chat"
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    output = tmp_path / "hf.json"
    config = make_config(
        coco_dir,
        None,
        output,
        backend="hf",
        hf_model=str(model_dir),
        model=None,
        limit=2,
        max_tokens=8,
        temperature=0,
        num_actors=1,
        batch_size=3,
    )
    report = run_generate(config, seed=0)
    assert report["input"] == 6 == report["written"] + sum(report["skipped"].values())
    assert report["requests"]["this_run"] == 6 and report["model"] == str(model_dir)
    records = Journal(f"{output}{JOURNAL_SUFFIX}").load()
    assert set(records) == {f"{i}-{kind}" for i in (1, 2) for kind in TYPES}
    for record in records.values():  # gibberish, but every request has a reply or a reason
        assert ("reply" in record) != ("error" in record)
        assert record.get("finish_reason") in ("stop", "length", None)

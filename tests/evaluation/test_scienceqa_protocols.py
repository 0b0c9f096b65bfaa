"""ScienceQA as the paper ran it: QCM-LEA fine-tuning data through prepare, and GPT-4 as the judge.

The release fixture is the official layout (``problems.json``, ``pid_splits.json``,
``images/{split}/{pid}/image.png``) for a few problems. The ensemble runs against
:class:`FakeLLM`, a real OpenAI-compatible ``POST /v1/chat/completions`` server on a free
loopback port (``ThreadingHTTPServer`` in a background thread): it checks each request's shape
(key, model, temperature, the reference's GPT-4 few-shot messages or the requery's two answers),
recognises the problem by its question, answers by a per-problem plan and counts what it saw,
so resuming is checked by what the server was asked.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image

from llava_ray.cli import build_parser, main
from llava_ray.config import ConfigError, validate_config
from llava_ray.config.evaluation import EvaluateConfig
from llava_ray.data.samples import PreparedSample, SamplePreparer
from llava_ray.data.sources import WorkItem
from llava_ray.endpoints.client import EndpointError
from llava_ray.evaluation.items import Outcome
from llava_ray.evaluation.job import write_results
from llava_ray.evaluation.scienceqa import (
    PROMPT_FORMATS,
    convert_scienceqa,
    llava_example,
    load_items,
    score,
)
from llava_ray.evaluation.scienceqa_ensemble import (
    JOURNAL_FILE,
    REQUERY_INSTRUCTION,
    ROWS_FILE,
    SUMMARY_FILE,
    ensemble_choice,
    run_ensemble,
)

API_KEY = "sk-sqa-test-secret"
LLM = "gpt-4-test"


def _problem(
    question, choices, answer, split, image=False, hint="", lecture="", solution="", subject="natural science"
):
    return {
        "question": question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "image": "image.png" if image else None,
        "lecture": lecture,
        "solution": solution,
        "subject": subject,
        "grade": "grade4",
        "split": split,
    }


TRAIN = {
    "10": _problem(
        "Which animal's feet are also adapted for grabbing prey?",
        ["ostrich", "bald eagle"],
        1,
        "train",
        image=True,
        hint="  ",
        lecture="An adaptation is an inherited trait.\nFeet are one kind of  adaptation.",
        solution="Look at the picture of the eagle.\nIts feet have sharp claws.",
    ),
    "11": _problem(
        "Which word would you find on a dictionary page with the guide words  cage - chirp?",
        ["cell", "cost", "crumb"],
        0,
        "train",
        hint="Guide  words are at the top of a page.",
        solution="Put the words in alphabetical order.",
        subject="language science",
    ),
    "12": _problem("What is shown?", ["a cat", "a dog"], 0, "train", image=True),  # image file absent
    "13": _problem("Which is a solid?", ["milk", "juice", "a rock"], 2, "train"),  # no lecture, no solution
    "14": _problem("Broken: one option", ["only"], 0, "train"),  # skipped: bad_choices
}
TEST = {
    "20": _problem("Which is a mammal?", ["a dog", "a frog"], 0, "test", image=True),
    "21": _problem("Which word is a noun?", ["table", "run"], 0, "test", hint="Nouns name things."),
    "22": _problem("Which state is highlighted?", ["Ohio", "Utah", "Maine"], 2, "test", image=True),
    "23": _problem("Which is heavier?", ["a feather", "a brick"], 1, "test"),
    "24": _problem("Which is a liquid?", ["water", "a stone"], 0, "test"),
    "25": _problem("Which is colder?", ["fire", "ice"], 1, "test"),
    "26": _problem("Which simple machine is shown?", ["a lever", "a pulley"], 0, "test", image=True),
    "27": _problem("Which country is shown?", ["Chile", "Peru"], 0, "test", image=True),  # image file absent
}

# pid -> the model's reply (None: the generation failed); 27 has no results row (skipped at conversion).
MODEL = {
    "20": "Dogs have fur. The answer is A.",
    "21": "The answer is B.",
    "22": "The answer is C.",
    "23": None,
    "24": "The answer is A.",
    "25": "The answer is A.",
    "26": "Maybe the lever.",
}
# pid -> what the LLM does: its text-only reply, then its requery reply (where it is asked again).
PLAN = {
    "20": {"text": "Dogs are mammals. The answer is A."},
    "21": {
        "text": "A table is a thing. The answer is A.",
        "requery": "Assistant 2 is right. The answer is A.",
    },
    "22": {"text": "I cannot see the map."},  # unparsable: the model's answer stands
    "23": {"text": "A brick weighs more. The answer is B."},  # the model has none: the LLM's stands
    "24": {"text": "rate_limited_once:The answer is B.", "requery": "No idea."},  # requery unparsable
    "25": {"text": "server_error"},  # fails every attempt: the model's answer stands, asked again next run
    "26": {"text": "The answer is B.", "requery": "The answer is A because levers turn."},  # unescaped dot
    "27": {"text": "The answer is A."},
}
TEXT_USER = re.compile(
    r"^Can you explain Question: (?P<question>.*)\nContext: (.*)\nOptions: (\(A\) .*)\?$", re.S
)
REQUERY_USER = re.compile(
    r"^Question: (?P<question>.*)\nContext: .*\nOptions: \(A\) .*\n\n"
    r"\[Assistant 1\]\n(?P<first>.*)\n\[End of Assistant 1\]\n\n"
    r"\[Assistant 2\]\n(?P<second>.*)\n\[End of Assistant 2\]\n\n" + re.escape(REQUERY_INSTRUCTION) + "$",
    re.S,
)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scienceqa_release")
    (root / "problems.json").write_text(json.dumps({**TRAIN, **TEST}))
    splits = {"train": list(TRAIN), "val": [], "test": list(TEST), "minitest": ["20", "21"]}
    (root / "pid_splits.json").write_text(json.dumps(splits))
    for pid, problem in {**TRAIN, **TEST}.items():
        if problem["image"] and pid not in ("12", "27"):
            folder = root / "images" / problem["split"] / pid
            folder.mkdir(parents=True)
            Image.new("RGB", (48, 30), (int(pid) * 9 % 255, 90, 160)).save(folder / "image.png")
    return root


def _convert(release: Path, split: str, out: Path, prompt_format: str) -> Path:
    return convert_scienceqa(
        str(release / "problems.json"),
        str(release / "pid_splits.json"),
        str(release / "images"),
        split,
        out,
        prompt_format=prompt_format,
    )


# ---- fine-tuning data ------------------------------------------------------------------------------


def test_qcm_lea_training_data_is_the_reference_format(release, tmp_path):
    out = _convert(release, "train", tmp_path / "llava_train_QCM-LEA.json", "QCM-LEA")
    samples = {sample["id"]: sample for sample in json.loads(out.read_text())}
    assert list(samples) == ["10", "11", "13"]
    eagle, words, rock = samples["10"], samples["11"], samples["13"]
    assert eagle["image"] == "train/10/image.png" and "image" not in words
    assert eagle["conversations"] == [
        {
            "from": "human",
            "value": "<image>\nWhich animal's feet are also adapted for grabbing prey?\nContext: N/A\n"
            "Options: (A) ostrich (B) bald eagle",
        },
        {
            "from": "gpt",
            "value": "An adaptation is an inherited trait.\nFeet are one kind of adaptation. "
            "Look at the picture of the eagle.\nIts feet have sharp claws. The answer is B.",
        },
    ]
    assert words["conversations"][0]["value"] == (
        "Which word would you find on a dictionary page with the guide words cage - chirp?\n"
        "Context: Guide words are at the top of a page.\nOptions: (A) cell (B) cost (C) crumb"
    )
    # An empty lecture leaves the reference's double space, collapsed once; both empty leave a leading space.
    assert words["conversations"][1]["value"] == "Put the words in alphabetical order. The answer is A."
    assert rock["conversations"][1]["value"] == " The answer is C."
    assert [samples[pid]["answer"] for pid in samples] == ["B", "A", "C"]
    report = json.loads(out.with_name("llava_train_QCM-LEA.report.json").read_text())
    assert report["input"] == 5 and report["written"] == 3 and report["prompt_format"] == "QCM-LEA"
    assert report["skipped"] == {"image_missing": 1, "bad_choices": 1}
    assert report["examples"]["image_missing"] == [
        "12: no train/12/image.png under " + str(release / "images")
    ]
    assert report["examples"]["bad_choices"][0].startswith("14: ")


def test_qcm_lepa_labels_lecture_and_solution():
    human, gpt = llava_example(TRAIN["10"], "QCM-LEPA")
    assert human.startswith("Which animal's feet")
    assert gpt == (
        "LECTURE: An adaptation is an inherited trait.\nFeet are one kind of adaptation.\n"
        "SOLUTION: Look at the picture of the eagle.\nIts feet have sharp claws.\n###\nANSWER: B."
    )
    assert llava_example(TRAIN["11"], "QCM-LEPA")[1] == (
        "SOLUTION: Put the words in alphabetical order.\n###\nANSWER: A."
    )
    with pytest.raises(ValueError, match=r"prompt format 'QCM-LEPAX' is not one of CQM-A, CQM-LEA"):
        llava_example(TRAIN["10"], "QCM-LEPAX")


def test_training_data_prepares_without_a_skip_or_a_change(release, tmp_path):
    """The converted file is a data source as it stands: every sample tokenised, its answer supervised."""
    out = _convert(release, "train", tmp_path / "train.json", "QCM-LEA")
    config = validate_config(
        {
            "model": {"preset": "tiny", "init": "random", "model_max_length": 1024},
            "train": {"stage": "finetune", "global_batch_size": 8, "micro_batch_size": 4},
            "data": {
                "sources": [{"path": str(out), "image_root": str(release / "images")}],
                "image_format": "png",
            },
        }
    )
    preparer = SamplePreparer.from_config(config)
    records = json.loads(out.read_text())
    items = [
        WorkItem(row, 0, record["id"], f"train.json[{row}]", json.dumps(record), copies=1)
        for row, record in enumerate(records)
    ]
    prepared = preparer.prepare(items)
    assert all(isinstance(sample, PreparedSample) for sample in prepared), prepared
    assert [(sample.id, sample.modality, len(sample.images)) for sample in prepared] == [
        ("10", "image", 1),
        ("11", "text", 0),
        ("13", "text", 0),
    ]
    assert all(sample.changes == () for sample in prepared)  # already the reference's layout
    for sample, record in zip(prepared, records, strict=True):
        supervised = [
            token for token, label in zip(sample.input_ids, sample.labels, strict=True) if label != -100
        ]
        text = preparer.tokenizer.decode(supervised, skip_special_tokens=True)
        assert record["conversations"][1]["value"].strip() in text


def test_scienceqa_convert_command(release, tmp_path, capsys):
    out = tmp_path / "llava_test_QCM-LEA.json"
    assert (
        main(
            [
                "scienceqa-convert",
                "--scienceqa-dir",
                str(release),
                "--split",
                "test",
                "--format",
                "QCM-LEA",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote 7 QCM-LEA samples of split test to {out} (1 skipped: {{'image_missing': 1}})" in printed
    first = json.loads(out.read_text())[0]
    # The fine-tuned model's evaluation file: the training prompt, no single-letter instruction.
    assert (
        first["conversations"][0]["value"]
        == "<image>\nWhich is a mammal?\nContext: N/A\nOptions: (A) a dog (B) a frog"
    )
    assert (
        main(["scienceqa-convert", "--scienceqa-dir", str(release), "--split", "dev", "--out", str(out)]) == 2
    )
    assert "split 'dev' is not in" in capsys.readouterr().err
    for prompt_format in PROMPT_FORMATS:  # the command offers every format the converter writes
        args = [
            "scienceqa-convert",
            "--scienceqa-dir",
            "d",
            "--split",
            "s",
            "--out",
            "o",
            "--format",
            prompt_format,
        ]
        assert build_parser().parse_args(args).format == prompt_format


# ---- the GPT-4-as-judge ensemble ---------------------------------------------------------------------


class FakeLLM:
    """The server of the module docstring; ``plan`` maps pid -> {"text": ..., "requery": ...}."""

    def __init__(self, shots: int) -> None:
        self.shots = shots
        self.plan = {pid: dict(entry) for pid, entry in PLAN.items()}
        self.pid_of = {problem["question"]: pid for pid, problem in TEST.items()}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.text_replies: dict[str, str] = {}
        self.shape_errors: list[str] = []
        self.shots_seen: set[tuple[str, ...]] = set()
        self.lock = threading.Lock()

    def reply(self, body: dict, authorization: str | None) -> tuple[int, dict]:
        if authorization != f"Bearer {API_KEY}":
            return 401, {"error": {"message": "invalid api key"}}
        if (
            body.get("model") != LLM
            or body.get("temperature") != 0.0
            or not isinstance(body.get("max_tokens"), int)
        ):
            self.shape_errors.append(f"settings: { ({k: v for k, v in body.items() if k != 'messages'}) }")
        messages = body["messages"]
        if messages[0] != {"role": "system", "content": "You are a helpful assistant."}:
            self.shape_errors.append(f"system: {messages[0]}")
        if messages[-1] == {"role": "assistant", "content": "Answer:"}:
            kind, match = "text", self._check_text(messages)
        else:
            kind, match = (
                "requery",
                REQUERY_USER.match(messages[-1]["content"]) if len(messages) == 2 else None,
            )
        if match is None:
            self.shape_errors.append(f"{kind}: {messages}")
            return 400, {"error": {"message": "bad request"}}
        pid = self.pid_of[match["question"]]
        if kind == "requery" and (
            match["first"] != MODEL[pid] or match["second"] != self.text_replies.get(pid)
        ):
            self.shape_errors.append(f"requery {pid}: {match['first']!r} / {match['second']!r}")
        with self.lock:
            self.requests[(pid, kind)] += 1
            seen = self.requests[(pid, kind)]
        behaviour = self.plan[pid].get(kind, "unplanned")
        if behaviour == "unplanned":
            self.shape_errors.append(f"unplanned {kind} for {pid}")
        if behaviour == "server_error":
            return 500, {"error": {"message": "overloaded"}}
        if behaviour.startswith("rate_limited_once:"):
            if seen == 1:
                return 429, {"error": {"message": "slow down"}}
            behaviour = behaviour.split(":", 1)[1]
        if kind == "text":
            self.text_replies[pid] = behaviour
        return 200, {
            "choices": [{"message": {"role": "assistant", "content": behaviour}, "finish_reason": "stop"}]
        }

    def _check_text(self, messages: list[dict]) -> re.Match | None:
        """System, ``shots`` worked examples in the reference's GPT-4 format, the question, "Answer:"."""
        if len(messages) != 3 + 2 * self.shots:
            return None
        for user, assistant in zip(messages[1:-2:2], messages[2:-2:2], strict=True):
            if user["role"] != "user" or not TEXT_USER.match(user["content"]):
                return None
            if assistant["role"] != "assistant" or not re.fullmatch(
                r"Answer: [^\n]*The answer is [A-E]\.", assistant["content"]
            ):
                return None  # line breaks of lectures are written as the two characters \n
        with self.lock:
            self.shots_seen.add(tuple(TEXT_USER.match(m["content"])["question"] for m in messages[1:-2:2]))
        return TEXT_USER.match(messages[-2]["content"]) if messages[-2]["role"] == "user" else None


@pytest.fixture
def llm(serve_chat_completions) -> Iterator[tuple[FakeLLM, str]]:
    fake = FakeLLM(shots=2)
    with serve_chat_completions(fake.reply) as base_url:
        yield fake, base_url


@pytest.fixture
def model_results(release, tmp_path) -> Path:
    """The fine-tuned model's results.jsonl, written by the evaluate job's own scoring and writer."""
    converted = _convert(release, "test", tmp_path / "llava_test_QCM-LEA.json", "QCM-LEA")
    items = load_items(str(converted), str(release / "images"))
    outcomes = {
        item.id: Outcome(MODEL[item.id])
        if MODEL[item.id] is not None
        else Outcome(None, "generation_failed", "CUDA OOM")
        for item in items
    }
    rows, scored = score(items, outcomes)
    out = tmp_path / "eval"
    out.mkdir()
    write_results(out, rows, {"benchmark": "scienceqa", **scored})
    assert scored["metrics"]["accuracy"] == 3 / 7  # the evaluate job's own view: 7 converted problems
    return out


def _config(release: Path, base_url: str, output_dir: Path, **ensemble) -> EvaluateConfig:
    return EvaluateConfig(
        output_dir=str(output_dir),
        scienceqa_ensemble={
            "base_url": base_url,
            "model": LLM,
            "scienceqa_dir": str(release),
            "max_retries": 1,
            "backoff_initial_s": 0,
            "backoff_max_s": 0,
            **ensemble,
        },
    )


def test_ensemble_end_to_end_and_resume(llm, release, model_results, monkeypatch):
    fake, base_url = llm
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    config = _config(release, base_url, model_results)
    summary = run_ensemble(config)
    assert fake.shape_errors == []
    table = summary["table"]
    assert summary["problems"] == 8 and summary["shots"] == 2
    assert table["model"] == {"accuracy": 3 / 8, "accuracy/image": 2 / 4, "unparsable": 1, "no_answer": 2}
    assert table["text_llm"] == {"accuracy": 4 / 8, "accuracy/image": 2 / 4, "unparsable": 1, "failed": 1}
    assert table["ensemble"] == {
        "accuracy": 7 / 8,
        "accuracy/image": 4 / 4,
        "agreed": 1,
        "requeried": 3,
        "requery_decided": 2,
        "requery_unparsable": 1,
        "requery_failed": 0,
    }
    assert table["text_llm_or_model"]["accuracy"] == 5 / 8 and table["upper_bound"]["accuracy"] == 6 / 8
    assert summary["model_errors"] == {"generation_failed": 1, "missing": 1}
    assert summary["requests"] == {
        "text": 8,
        "requery": 3,
        "from_journal": 0,
        "failed": 1,
        "failed_examples": ["text/25: HTTP 500 after 2 attempts"],
    }
    assert fake.requests[("24", "text")] == 2 and fake.requests[("25", "text")] == 2  # 429 retried; 500 twice
    assert {pid for pid, kind in fake.requests if kind == "requery"} == {"21", "24", "26"}

    rows = {row["id"]: row for row in map(json.loads, (model_results / ROWS_FILE).read_text().splitlines())}
    assert {pid: row["source"] for pid, row in rows.items()} == {
        "20": "agree",
        "21": "requery",
        "22": "model",
        "23": "text_llm",
        "24": "model",
        "25": "model",
        "26": "requery",
        "27": "text_llm",
    }
    assert rows["25"]["text_error"] == "HTTP 500 after 2 attempts" and rows["25"]["correct"] is False
    assert rows["27"]["model_error"] == "missing" and rows["23"]["model_error"] == "generation_failed"
    assert json.loads((model_results / SUMMARY_FILE).read_text())["metrics"]["ensemble/accuracy"] == 7 / 8

    # A rerun asks only what failed; the server, healthy again, settles problem 25 with a requery.
    fake.plan["25"] = {"text": "Ice is frozen water. The answer is B.", "requery": "The answer is B."}
    again = run_ensemble(config)
    assert again["requests"] == {
        "text": 1,
        "requery": 1,
        "from_journal": 10,
        "failed": 0,
        "failed_examples": [],
    }
    assert again["table"]["ensemble"]["accuracy"] == 8 / 8 and again["table"]["text_llm"]["failed"] == 0
    assert fake.requests[("25", "text")] == 3 and fake.requests[("25", "requery")] == 1
    assert sum(fake.requests.values()) == 8 + 2 + 3 + 2  # first run (with retries) + the rerun's two
    journal = [json.loads(line) for line in (model_results / JOURNAL_FILE).read_text().splitlines()]
    assert len(journal) == 12 and all(record["key"] for record in journal)  # failures are not journalled
    assert fake.shape_errors == []


def test_the_shots_are_train_problems_in_the_reference_gpt4_format(llm, release, model_results, monkeypatch):
    from llava_ray.evaluation.scienceqa_ensemble import text_messages

    messages = text_messages(TEST["20"], [TRAIN["10"], TRAIN["11"]])
    assert messages[1] == {
        "role": "user",
        "content": "Can you explain Question: Which animal's feet are also adapted for grabbing prey?\n"
        "Context: N/A\nOptions: (A) ostrich (B) bald eagle?",
    }
    assert messages[2] == {
        "role": "assistant",
        "content": "Answer: An adaptation is an inherited trait.\\nFeet are one kind of adaptation. "
        "Look at the picture of the eagle.\\nIts feet have sharp claws. The answer is B.",
    }
    assert messages[-1] == {"role": "assistant", "content": "Answer:"}
    fake, base_url = llm
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    run_ensemble(_config(release, base_url, model_results))
    # The same two shots before every question, drawn as ScienceQA's GPT-3 script draws them.
    drawn = random.Random(10).sample(["10", "11", "12", "13"], 2)  # 12 lacks its image file: fine for text
    assert fake.shots_seen == {tuple(TRAIN[pid]["question"].replace("  ", " ") for pid in drawn)}

    fake.shots = 0  # the server now expects no worked examples
    summary = run_ensemble(_config(release, base_url, model_results, shots=0, shot_seed=1))
    assert summary["shots"] == 0 and summary["requests"]["text"] == 8  # other messages: asked again
    assert fake.shape_errors == []
    with pytest.raises(
        ConfigError, match=r"evaluate.scienceqa_ensemble.shots=5 but the train split of .* has 4 usable"
    ):
        run_ensemble(_config(release, base_url, model_results, shots=5))


def test_ensemble_choice_follows_the_reference():
    assert ensemble_choice(True, "A", "A", None) == ("A", "agree")
    assert ensemble_choice(True, "A", "B", "B") == ("B", "requery")
    assert ensemble_choice(True, "A", "B", None) == ("A", "model")  # requery without a letter
    assert ensemble_choice(True, None, "B", None) == ("B", "text_llm")  # ... and the model had none either
    assert ensemble_choice(True, "A", None, None) == ("A", "model")
    assert ensemble_choice(False, None, "B", None) == ("B", "text_llm")
    assert ensemble_choice(False, None, None, None) == (None, "model")


def test_a_refused_key_stops_the_run(llm, release, model_results, monkeypatch):
    _, base_url = llm
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(
        EndpointError,
        match=r"the text-only LLM endpoint refuses requests: HTTP 401 .*invalid api key.*"
        r"Check evaluate\.scienceqa_ensemble\.base_url",
    ):
        run_ensemble(_config(release, base_url, model_results))


def test_every_config_problem_is_listed_before_any_request(tmp_path):
    config = EvaluateConfig(output_dir=str(tmp_path), scienceqa_ensemble={"scienceqa_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as error:
        run_ensemble(config)
    message = str(error.value)
    assert "evaluate.scienceqa_ensemble.model is not set" in message
    assert (
        f"evaluate.scienceqa_ensemble.scienceqa_dir={str(tmp_path)!r}: problems.json does not exist"
        in message
    )
    assert ": pid_splits.json does not exist" in message
    assert (
        f"the model's results {str(tmp_path / 'results.jsonl')!r}: does not exist; run `llava-ray evaluate`"
        in message
    )


def test_an_unknown_split_is_a_config_error(release, model_results):
    config = _config(release, "http://127.0.0.1:9/v1", model_results, split="dev")
    with pytest.raises(
        ConfigError, match=r"evaluate.scienceqa_ensemble: split 'dev' is not in .*pid_splits.json"
    ):
        run_ensemble(config)


def test_scienceqa_ensemble_command(llm, release, model_results, tmp_path, monkeypatch, capsys):
    _, base_url = llm
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    section = _config(release, base_url, model_results).scienceqa_ensemble.model_dump(exclude={"api_key"})
    config_file = tmp_path / "sqa.yaml"
    config_file.write_text(yaml.safe_dump({"evaluate": {"scienceqa_ensemble": section}}))
    code = main(["scienceqa-ensemble", "--config", str(config_file), f"evaluate.output_dir={model_results}"])
    printed = capsys.readouterr().out
    assert code == 1  # one request failed: the next run asks it again
    assert re.search(r"^model\s+37\.50%\s+50\.00%  1 unparsable, 2 without an answer$", printed, re.M)
    assert re.search(r"^text_llm\s+50\.00%\s+50\.00%  1 unparsable, 1 failed$", printed, re.M)
    assert re.search(r"^ensemble\s+87\.50%\s+100\.00%  1 agreed, 3 requeried", printed, re.M)
    assert "requests: 8 text, 3 requery, 0 from the journal, 1 failed" in printed

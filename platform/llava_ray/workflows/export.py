"""``llava-ray export``: a model folder from any complete checkpoint of a run, LoRA merged or as an adapter.

    llava-ray export --from RUN_DIR_OR_CHECKPOINT --out DIR [--lora merge|adapter]

``--from`` is a run folder (``{run.storage_path}/{run.name}``: its newest intact checkpoint is
exported, corrupt ones are skipped and named; a finished run's newest checkpoint is its final step, the
same weights as its ``final/``) or one ``checkpoint_*`` folder (refused unless intact). Local or
``s3://``. Checkpoints are self-describing (run config, architecture and tokenizer, see
:mod:`llava_ray.training.checkpoint`), so nothing else is needed; every file is checked against the
manifests before anything is read, and ZeRO shards are consolidated with pickles loaded ``weights_only``.

``DIR`` receives a llava-ray folder (what ``model.init_from`` takes) and its Hugging Face LLaVA export in
``hf/`` (a stock ``LlavaForConditionalGeneration``; absent for projectors HF cannot hold). A LoRA run
with ``--lora merge`` (the default) folds the adapters into the LM; with ``--lora adapter`` the folders
hold the base model and ``adapter/`` holds the adapter in PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``) for the LM: ``PeftModel.from_pretrained(LlavaModel.from_pretrained(DIR)
.language_model, DIR/adapter)``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer

from llava_ray.config.schema import LlavaRayConfig
from llava_ray.model.llava import LlavaModel
from llava_ray.model.weights import read_llava_ray_config
from llava_ray.training.checkpoint import (
    CHECKPOINT_TAG,
    MODEL_DIR,
    RUN_CONFIG_FILE,
    CheckpointError,
    manifest_name,
    newest_intact_checkpoint,
    verify_checkpoint,
    verify_local_checkpoint,
    weights_only_loads,
)
from llava_ray.training.final_model import ADAPTER_DIR, HF_DIR, write_model_folder
from llava_ray.training.trainable import merge_lora, set_trainable
from llava_ray.utils.storage import filesystem, is_remote, local_copy

logger = logging.getLogger(__name__)

LORA_MODES = ("merge", "adapter")


@dataclass
class ExportSummary:
    """What ``run_export`` wrote; ``lines()`` is what the CLI prints."""

    checkpoint: str  # the checkpoint folder exported
    step: int | None  # its optimizer step
    out: str  # the llava-ray folder
    hf_dir: str | None  # the Hugging Face LLaVA export, None when the projector has no HF equivalent
    adapter_dir: str | None  # the PEFT adapter (--lora adapter), else None
    lora: Literal["merged", "adapter", "none"]  # what became of LoRA ('none': the run trained no LoRA)
    note: str  # the Hugging Face export's note

    def lines(self) -> str:
        text = [
            f"exported {self.checkpoint} (step {self.step}) to {self.out}",
            f"  llava-ray folder: {self.out} (model.init_from takes it)",
            f"  Hugging Face LLaVA: {self.hf_dir}"
            if self.hf_dir
            else f"  no Hugging Face export:{self.note}",
        ]
        if self.adapter_dir:
            text.append(
                f"  PEFT adapter of the language model: {self.adapter_dir} (the folders above hold the base)"
            )
        elif self.lora == "merged":
            text.append("  LoRA adapters merged into the language model")
        return "\n".join(text)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_export(source: str, out: str, lora: str = "merge") -> ExportSummary:
    """Export a run's newest intact checkpoint, or one checkpoint folder, as model folders.

    Args:
        source: a run folder (``{run.storage_path}/{run.name}``) or one of its ``checkpoint_*`` folders,
            local or remote (``s3://``).
        out: where to write (local or remote); must not exist or be empty.
        lora: ``merge`` folds LoRA adapters into the LM; ``adapter`` keeps the base weights and writes
            the adapter to ``out/adapter`` in PEFT's format. Refused for a run that trained no LoRA.

    Returns:
        An :class:`ExportSummary`; ``print(summary.lines())`` describes it for a person.

    Raises:
        ValueError: bad ``lora``, a non-empty ``out``, ``adapter`` for a run without LoRA, or a source that
            is neither a run folder nor a checkpoint.
        CheckpointError: no intact checkpoint (each problem named).
    """
    if lora not in LORA_MODES:
        raise ValueError(f"--lora {lora!r} is unknown; use one of {', '.join(LORA_MODES)}")
    check_out_free(out)
    checkpoint, step = resolve_checkpoint(source)
    local = Path(local_copy(checkpoint))
    if is_remote(checkpoint):  # the copy is what gets read: check it, not only the original
        verify_local_checkpoint(local)
    config = LlavaRayConfig.model_validate(json.loads((local / RUN_CONFIG_FILE).read_text()))
    model = empty_model(local / MODEL_DIR)
    has_lora = config.train.trainable == "lora"
    if has_lora:
        set_trainable(model, "lora", lora=config.train.lora)
    elif lora == "adapter":
        raise ValueError(
            f"--lora adapter, but {checkpoint} was trained with train.trainable={config.train.trainable!r}: it has "
            "no LoRA adapters; export it with --lora merge"
        )
    state = consolidated_state_dict(local, config.deepspeed.zero_stage)
    model.load_state_dict(state, assign=True, strict=True)
    model.language_model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(local / MODEL_DIR)
    keep_adapter = has_lora and lora == "adapter"
    with tempfile.TemporaryDirectory(prefix="llava-ray-adapter-") as scratch:
        adapter_dir = Path(scratch) / ADAPTER_DIR if keep_adapter else None
        if adapter_dir is not None:
            model.language_model.save_pretrained(adapter_dir)  # before unload() takes the adapters out
            model.language_model = model.language_model.unload()  # the base LM, adapters removed, not merged
        else:
            merge_lora(model)
        note = write_model_folder(
            model.float(), tokenizer, config.data.template, out, adapter_dir=adapter_dir
        )
    fs, path = filesystem(out)
    summary = ExportSummary(
        checkpoint=checkpoint,
        step=step,
        out=out,
        hf_dir=f"{out.rstrip('/')}/{HF_DIR}" if fs.exists(f"{path.rstrip('/')}/{HF_DIR}") else None,
        adapter_dir=f"{out.rstrip('/')}/{ADAPTER_DIR}" if keep_adapter else None,
        lora="none" if not has_lora else ("adapter" if keep_adapter else "merged"),
        note=note,
    )
    logger.info(f"[export] {summary.lines()}")
    return summary


def check_out_free(out: str) -> None:
    fs, path = filesystem(out)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise ValueError(
            f"--out {out!r} exists and is not empty; choose a new folder (export never overwrites)"
        )


def resolve_checkpoint(source: str) -> tuple[str, int | None]:
    """The intact checkpoint ``source`` names: itself (a checkpoint folder) or a run folder's newest."""
    fs, path = filesystem(source)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise ValueError(f"--from {source!r} does not exist")
    if fs.exists(f"{path}/{manifest_name(0)}") or fs.exists(f"{path}/{CHECKPOINT_TAG}"):
        verification = verify_checkpoint(fs, path)
        if not verification.intact:
            raise CheckpointError(
                f"--from {source!r} is not an intact checkpoint: "
                + "; ".join(verification.problems)
                + "; pass its run folder to export the newest intact one"
            )
        return source.rstrip("/"), verification.step
    checkpoint, verification = newest_intact_checkpoint(source)
    return checkpoint, verification.step


def empty_model(model_dir: Path) -> LlavaModel:
    """A weightless (meta) model of the architecture a checkpoint's ``model/`` records."""
    with torch.device("meta"):
        return LlavaModel.from_record(read_llava_ray_config(model_dir))


def consolidated_state_dict(checkpoint_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a DeepSpeed checkpoint, from every rank's ZeRO files.

    ZeRO-2/3 shards go through DeepSpeed's ``zero_to_fp32`` (the fp32 master weights, frozen
    parameters included); ZeRO-0/1 keep the whole module in ``mp_rank_00_model_states.pt``. Every
    pickle is loaded ``weights_only``.
    """
    with weights_only_loads():
        if zero_stage >= 2:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
        else:
            states = torch.load(
                checkpoint_dir / CHECKPOINT_TAG / "mp_rank_00_model_states.pt",
                map_location="cpu",
                weights_only=True,
            )
            state = states["module"]
    # zero_to_fp32 hands out views into its flat fp32 partitions: copy each, or safetensors refuses to
    # save tensors that share one storage.
    return {
        key: (value.float() if value.is_floating_point() else value).clone() for key, value in state.items()
    }

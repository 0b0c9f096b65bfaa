"""Step metrics: the FLOPs model behind MFU and the progress line."""

from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.model.build import build_llava_model
from llava_ray.training.metrics import FlopsModel, StepMetrics, format_progress
from llava_ray.training.trainable import set_trainable


def test_flops_count_backward_through_a_frozen_lm():
    config = ModelConfig(preset="tiny")
    model = build_llava_model(config, load_tokenizer(config))
    lm = sum(p.numel() for p in model.language_model.parameters())
    vision = sum(p.numel() for p in model.vision_tower.parameters())
    stage1 = FlopsModel.of(set_trainable(model, "projector"))
    assert (stage1.lm_params, stage1.lm_trainable, stage1.vision_params, stage1.vision_trainable) == (
        lm,
        0,
        vision,
        0,
    )
    assert stage1.step_flops(tokens=10, image_positions=64) == 10 * 4 * lm + 64 * 2 * vision
    full = FlopsModel.of(set_trainable(model, "full"))
    assert full.step_flops(tokens=10, image_positions=0) == 10 * 6 * lm  # the classic 6N per token


def test_progress_line_reads_like_a_sentence():
    metrics = StepMetrics(
        loss=2.5,
        learning_rate=1e-3,
        projector_learning_rate=1e-3,
        grad_norm=1.5,
        samples=32,
        tokens=3200,
        supervised_tokens=640,
        padding_fraction=0.1,
        seconds=2.0,
        peak_memory_gib=1.25,
        world_size=2,
        mfu=0.4,
    )
    line = format_progress(12, 50, metrics, eta_s=83)
    assert line == (
        "[train] step 12/50 loss 2.5000 lr 1.00e-03 gnorm 1.5 | 16.0 samples/s 1600 tok/s (supervised 320) "
        "pad 10% mfu 40.0% | peak mem 1.25 GiB | ETA 0:01:23"
    )

"""Training progress: a line every N steps or every few seconds, whichever is coarser."""

from llava_ray.training.metrics import ProgressMeter, StepMetrics


def _metrics(loss: float) -> StepMetrics:
    return StepMetrics(
        loss=loss,
        learning_rate=1e-3,
        projector_learning_rate=1e-3,
        grad_norm=None,
        samples=16,
        tokens=1600,
        supervised_tokens=320,
        padding_fraction=0.0,
        seconds=0.5,
        peak_memory_gib=1.0,
        world_size=2,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_ten_seconds_and_at_the_end():
    clock = FakeClock()
    meter = ProgressMeter(total_steps=100, start_step=0, every_steps=1, every_s=10.0, clock=clock)
    lines = {}
    for step in range(1, 101):
        clock.now += 0.5
        if line := meter.update(step, _metrics(loss=float(step))):
            lines[step] = line
    assert list(lines) == [20, 40, 60, 80, 100]
    # the line covers the 20 steps since the last one: mean loss, their samples over their time
    assert lines[40].startswith("[train] step 40/100 loss 30.5000 lr 1.00e-03 | 32.0 samples/s")
    assert lines[40].endswith("ETA 0:00:30")


def test_every_steps_when_coarser_than_the_clock():
    clock = FakeClock()
    meter = ProgressMeter(total_steps=30, start_step=5, every_steps=10, every_s=0.0, clock=clock)
    due = []
    for step in range(6, 31):
        clock.now += 1.0
        if meter.update(step, _metrics(1.0)):
            due.append(step)
    assert due == [15, 25, 30]

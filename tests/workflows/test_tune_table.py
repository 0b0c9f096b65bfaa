"""The sweep table's error column names the exception, not Ray's wrapper line."""

from llava_ray.workflows.tune import error_summary


def test_error_summary_is_the_last_exception_line_of_a_trial_error():
    wrapped = RuntimeError(
        "ray::ImplicitFunc.train() (pid=6017, ip=192.0.2.2, actor_id=abc)\n"
        '  File "trainable.py", line 331, in train\n'
        "    raise skipped from exception_cause(skipped)\n"
        "ray.train.TrainingFailedError: Training failed due to worker errors:\n"
        "ValueError: data.prepared_path has no report.json\n"
    )
    assert error_summary(wrapped) == "ValueError: data.prepared_path has no report.json"
    assert error_summary(RuntimeError("something odd\nlast words")) == "last words"
    assert error_summary(KeyError()) == "KeyError"

"""The package console: one logger to the real stdout, rank 0 by default, third-party noise quieted."""

import logging
import warnings
from collections.abc import Iterator

import pytest

from llava_ray.utils.logging import (
    PACKAGE_LOGGER,
    QUIET_LOGGERS,
    RAY_DATA_PROGRESS_LOGGER,
    ensure_logging,
    setup_logging,
    verbose_logging,
)


@pytest.fixture(autouse=True)
def restore_loggers() -> Iterator[None]:
    names = [PACKAGE_LOGGER, *QUIET_LOGGERS, RAY_DATA_PROGRESS_LOGGER]
    saved = {
        name: (logger.level, list(logger.handlers), logger.propagate)
        for name in names
        for logger in [logging.getLogger(name)]
    }
    with warnings.catch_warnings():
        yield
    for name, (level, handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


def test_package_lines_go_to_stdout_once(capfd):
    setup_logging()
    logging.getLogger("llava_ray.training.worker").info("[train] step 1/2")
    out, err = capfd.readouterr()
    assert out == "[train] step 1/2\n"
    assert err == ""


def test_setting_up_twice_keeps_one_handler(capfd):
    setup_logging()
    setup_logging()
    ensure_logging()
    logging.getLogger("llava_ray.x").info("once")
    assert capfd.readouterr().out == "once\n"


def test_other_ranks_log_warnings_only_unless_verbose(capfd):
    setup_logging(rank=1)
    child = logging.getLogger("llava_ray.training.worker")
    child.info("progress")
    child.warning("[fault] killing worker rank 1")
    assert capfd.readouterr().out == "[fault] killing worker rank 1\n"
    setup_logging(verbose=True, rank=1)
    child.info("progress")
    assert capfd.readouterr().out == "[rank 1] progress\n"


def test_third_party_loggers_at_warning_unless_verbose():
    setup_logging()
    assert not verbose_logging()
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed", "transformers", "mlflow"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    setup_logging(verbose=True)
    assert verbose_logging()
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.INFO


def test_ensure_logging_quiets_a_logger_an_import_reset():
    setup_logging()
    logging.getLogger("ray").setLevel(logging.INFO)  # what `import ray` does
    ensure_logging()
    assert logging.getLogger("ray").level == logging.WARNING


def test_collective_deprecations_are_filtered_and_others_kept():
    setup_logging()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what pytest does; setup_logging's filter must still win
        setup_logging()
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...",
            FutureWarning,
            stacklevel=2,
        )
        warnings.warn(
            "`torch.distributed._reduce_scatter_base` is a private function and will be deprecated.",
            FutureWarning,
            stacklevel=2,
        )
        warnings.warn("something else changes", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["something else changes"]


def test_ray_datas_bars_off_warning_is_silent_unless_verbose():
    """The driver turns Ray Data's progress bars off on purpose; Ray warns about it in every worker."""
    setup_logging()
    assert not logging.getLogger(RAY_DATA_PROGRESS_LOGGER).isEnabledFor(logging.WARNING)
    setup_logging(verbose=True)
    assert logging.getLogger(RAY_DATA_PROGRESS_LOGGER).isEnabledFor(logging.WARNING)

"""The sweep config of ``llava-ray tune``: a base stage config, a search space and how to search it.

Search-space keys are the dotted keys of the stage config (``model.projector``,
``train.learning_rate``, ...). Every value a sweep can give a key is validated against the stage
config before any trial starts: grid and choice values one by one, range bounds at both ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from llava_ray.config.loader import ConfigError, apply_overrides, describe_error, load_config, read_yaml
from llava_ray.config.paths import resolve_path
from llava_ray.config.schema import LlavaRayConfig, Section

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SearchDomain(Section):
    """Exactly one of the kinds below."""

    grid: list[Any] | None = Field(None, description="Every value, each in its own trial(s) (a grid search).")
    choice: list[Any] | None = Field(None, description="One value drawn per trial.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high]: a float drawn uniformly in log space (learning rates)."
    )
    randint: tuple[int, int] | None = Field(None, description="[low, high): an integer drawn uniformly.")

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDomain:
        given = [kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAIN_KINDS)} (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} needs at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} needs [low, high] with low < high")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs a positive low bound")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None)

    def values_to_check(self) -> list[Any]:
        """The values whose validity stands for the whole domain."""
        values = getattr(self, self.kind)
        return (
            list(values)
            if self.kind in ("grid", "choice")
            else [values[0], values[1] - (self.kind == "randint")]
        )

    def to_tune(self) -> Any:
        from ray import tune

        values = getattr(self, self.kind)
        return {
            "grid": tune.grid_search,
            "choice": tune.choice,
            "uniform": lambda bounds: tune.uniform(*bounds),
            "loguniform": lambda bounds: tune.loguniform(*bounds),
            "randint": lambda bounds: tune.randint(*bounds),
        }[self.kind](list(values))


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = Field(
        "asha",
        description="asha: stop weak trials early at validation milestones; none: run all trials fully.",
    )
    grace_period: int = Field(
        1, gt=0, description="ASHA: optimizer steps every trial runs before it can be stopped."
    )
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/reduction_factor of trials per rung.")
    max_t: int | None = Field(
        None, gt=0, description="ASHA: the step count of a full trial (default: the base config's steps)."
    )


class TrialResources(Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers per trial.")
    use_gpu: bool | Literal["auto"] = Field("auto", description="GPUs per worker (one each) or CPU only.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")


class SweepConfig(Section):
    name: str = Field(
        "llava-sweep", description="Sweep name: its folder, MLflow parent run; a rerun resumes."
    )
    base: str = Field(
        description="The stage config each trial trains (relative paths: to this file's folder)."
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="dotted.key=value overrides applied to the base config of every trial.",
    )
    search_space: dict[str, SearchDomain] = Field(description="dotted config key -> its domain.")
    metric: str = Field("val_loss", description="The reported metric trials are compared on.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher metric is better.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Early stopping.")
    search_alg: Literal["random", "optuna"] = Field(
        "random",
        description="random: grid/random variants (Ray Tune's basic generator); optuna: TPE (pip install optuna).",
    )
    num_samples: int = Field(
        1, gt=0, description="Samples of the space; with grid keys, each sample repeats the whole grid."
    )
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials at once (default: as many as the cluster's resources allow)."
    )
    trial_resources: TrialResources = Field(
        default_factory=TrialResources, description="Workers, GPUs and CPUs of each trial."
    )
    val_fraction: float = Field(
        0.05, gt=0, lt=1, description="Share of the data held out for the metric (train.val_fraction)."
    )
    eval_every_steps: int = Field(
        1, gt=0, description="Validation (a Tune result, an ASHA decision point) every N steps."
    )
    storage_path: str | None = Field(
        None, description="Where the sweep's folder goes (default: the base config's run.storage_path)."
    )

    @model_validator(mode="after")
    def _optuna_takes_no_grid(self) -> SweepConfig:
        if self.search_alg == "optuna" and any(d.kind == "grid" for d in self.search_space.values()):
            raise ValueError("search_alg 'optuna' cannot search a grid: use choice instead of grid")
        return self

    def trial_overrides(self) -> list[str]:
        """What every trial sets on top of the base config and ``overrides``."""
        resources = self.trial_resources
        return [
            *self.overrides,
            f"scaling.num_workers={resources.num_workers}",
            f"scaling.use_gpu={str(resources.use_gpu).lower()}",
            f"scaling.cpus_per_worker={resources.cpus_per_worker}",
            f"train.val_fraction={self.val_fraction}",
            f"train.eval_every_steps={self.eval_every_steps}",
            "train.save_final_model=false",
        ]


def override(key: str, value: Any) -> str:
    """A ``dotted.key=value`` override whose value parses back to ``value`` (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, LlavaRayConfig]:
    """The sweep and its base stage config; every search value is checked before any work.

    ``overrides`` are ``dotted.key=value`` for the sweep file itself (``sweep.num_samples=2``) or, for
    every other key, for the base stage config of each trial.
    """
    path = Path(path)
    raw = read_yaml(path)  # safe: no aliases, bounded size; errors are ConfigErrors
    sweep_overrides = [item.removeprefix("sweep.") for item in overrides if item.startswith("sweep.")]
    stage_overrides = [item for item in overrides if not item.startswith("sweep.")]
    raw_sweep, problems = apply_overrides(raw.get("sweep", raw), sweep_overrides)
    if problems:
        raise ConfigError([f"sweep: {problem}" for problem in problems], str(path))
    try:
        sweep = SweepConfig.model_validate(raw_sweep)
    except ValidationError as error:
        raise ConfigError([describe_error(e, SweepConfig) for e in error.errors()], str(path)) from None
    sweep = sweep.model_copy(update={"overrides": [*sweep.overrides, *stage_overrides]})
    base_path = Path(sweep.base)
    base_path = base_path if base_path.is_absolute() or base_path.exists() else path.parent / base_path
    sweep = sweep.model_copy(update={"base": str(base_path)})
    if sweep.storage_path:  # relative: against the driver's cwd, as the stage configs' paths (config.paths)
        sweep = sweep.model_copy(update={"storage_path": resolve_path(sweep.storage_path, Path.cwd())})
    problems = []
    try:
        base = load_config(base_path, sweep.trial_overrides())
    except ConfigError as error:
        raise ConfigError(
            [f"base ({base_path}): {problem}" for problem in error.problems], str(path)
        ) from None
    for key, domain in sweep.search_space.items():
        for value in domain.values_to_check():
            try:
                load_config(base_path, [*sweep.trial_overrides(), override(key, value)])
            except ConfigError as error:
                problems += [f"search_space.{key} value {value!r}: {problem}" for problem in error.problems]
    if problems:
        raise ConfigError(problems, str(path))
    return sweep, base

"""Load a YAML config, apply ``dotted.key=value`` overrides, and validate it before any work.

Every problem is collected and raised once as :class:`ConfigError`, one line per bad key with
its value and the fix: a typo is an error with a "did you mean" hint, never silently ignored.

The configs and sweeps llava-ray ships (what the demo runs, the LLaVA-1.5 recipes) are package data
under ``llava_ray/assets/``, found with :data:`SHIPPED_CONFIGS` and :data:`SHIPPED_SWEEPS` however
llava-ray is installed; in a checkout ``jobs/configs`` and ``jobs/sweeps`` link to them, so
``ray job submit --working-dir .`` jobs name them as before.

Reading is safe and portable:

- every YAML a user writes (config, sweep and pipeline files, override values) goes through
  :func:`llava_ray.utils.safe_yaml.load_yaml`: no aliases (a "billion laughs" file fails at once),
  bounded size and depth, and each parse error is one ConfigError line naming the file or override;
- string values may reference other keys, ``${run.root}``, and the environment, ``${env:NAME}`` or
  ``${env:NAME,default}`` (``$${`` is a literal ``${``), resolved after the overrides and before
  validation (:func:`resolve_references`), so one value moves every path of a recipe and
  ``llava-ray validate`` prints the result.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from collections.abc import Collection, Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llava_ray.config.paths import resolve_paths
from llava_ray.config.schema import LlavaRayConfig, cross_section_problems
from llava_ray.utils.safe_yaml import YamlError, YamlLimitError, load_yaml, read_yaml_file

if typing.TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11
    from importlib.resources.abc import Traversable

# Shipped YAMLs: stage and pipeline configs by model (tiny/, llava-1.5-7b/, ...), and sweeps. A sweep's
# base config is named relative to the sweep file (../../configs/...), so the two folders stay siblings.
SHIPPED_CONFIGS: Traversable = files("llava_ray") / "assets" / "configs"
SHIPPED_SWEEPS: Traversable = files("llava_ray") / "assets" / "sweeps"


class ConfigError(ValueError):
    """A config that cannot run; ``problems`` holds one line per bad key."""

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config{where} ({len(self.problems)} problem(s)):\n{lines}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], parsed value); values are parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError([f"override {text!r}: expected dotted.key=value, e.g. train.learning_rate=2e-5"])
    if not value.strip():
        return key.strip().split("."), None
    try:
        return key.strip().split("."), load_yaml(value)
    except YamlLimitError as error:
        raise ConfigError([f"override {text!r}: {error}"]) from None
    except YamlError as error:
        raise ConfigError(
            [
                f"override {text!r}: the value is not valid YAML ({error}); close every bracket and quote, "
                f"or pass text as a quoted YAML string ({key.strip()}='\"...\"' in a shell)"
            ]
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``raw`` with each well-formed override set, and one problem per bad override.

    List items are addressed by index (``data.sources.0.path=...``).
    """
    result = copy.deepcopy(raw)
    problems = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as error:
            problems.extend(error.problems)
            continue
        node: Any = result
        for depth, part in enumerate(path[:-1]):
            node, problem = _descend(node, part, ".".join(path[: depth + 1]))
            if problem:
                problems.append(f"override {text!r}: {problem}")
                break
        else:
            problem = _assign(node, path[-1], value)
            if problem:
                problems.append(f"override {text!r}: {problem}")
    return result, problems


def _descend(node: Any, part: str, dotted: str) -> tuple[Any, str | None]:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            return None, f"{dotted}: no list item {part!r} (the list has {len(node)})"
        return node[int(part)], None
    if isinstance(node, dict):
        if not isinstance(node.get(part), dict | list):
            node[part] = {}
        return node[part], None
    return None, f"{dotted} is a value, not a section"


def _assign(node: Any, part: str, value: Any) -> str | None:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            return f"no list item {part!r} (the list has {len(node)})"
        node[int(part)] = value
    else:
        node[part] = value
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; pass an existing YAML file"])
    try:
        raw = read_yaml_file(path)
    except YamlError as error:
        raise ConfigError([f"config file {str(path)!r}: {error}"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            [f"config file {str(path)!r} cannot be read ({error}); pass a readable UTF-8 file"]
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"config file {str(path)!r} must hold a mapping of sections, not {type(raw).__name__}"]
        )
    return raw


def validate_config(
    raw: dict[str, Any],
    source: str | None = None,
    earlier_problems: Sequence[str] = (),
    unresolved: Collection[str] = (),
) -> LlavaRayConfig:
    """Validate plain data into a :class:`LlavaRayConfig` or raise one :class:`ConfigError`.

    ``earlier_problems`` (bad overrides, say) are reported in the same error; field errors at the
    ``unresolved`` keys (whose ``${...}`` failed, already among them) are not reported twice.
    """
    problems = list(earlier_problems)
    try:
        config = LlavaRayConfig.model_validate(raw)
    except ValidationError as error:
        field_problems = [
            describe_error(e) for e in error.errors() if ".".join(map(str, e["loc"])) not in unresolved
        ]
        raise ConfigError([*problems, *field_problems], source) from None
    problems += cross_section_problems(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> LlavaRayConfig:
    """Load ``path`` (or the defaults when None), apply overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    raw, problems = apply_overrides(raw, overrides)
    raw, reference_problems, unresolved = resolve_references(raw)
    config = validate_config(raw, str(path) if path else None, [*problems, *reference_problems], unresolved)
    return resolve_paths(config)  # relative paths against this (the driver's) cwd, before any worker starts


# ${env:NAME} / ${env:NAME,default} / ${dotted.key}; $${ is a literal ${.
_REFERENCE = re.compile(r"\$\$\{|\$\{([^{}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Unresolved(Exception):
    """One reference that cannot be resolved; the message says why and how to fix it.

    ``dependent``: it failed only because the key it references failed (reported there, not again);
    ``cycle``: the references loop.
    """

    def __init__(self, message: str, dependent: bool = False, cycle: bool = False):
        super().__init__(message)
        self.dependent = dependent
        self.cycle = cycle


def resolve_references(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str], set[str]]:
    """A copy of ``raw`` with every ``${...}`` in its string values resolved, one problem per bad one,
    and the dotted keys left unresolved (including those that only reference a bad one).

    ``${run.root}`` is the value of another key set in the same config (by the file or an override;
    schema defaults are not visible), itself resolved first; ``${env:NAME}`` an environment variable of
    the process that loads the config (the Ray job's driver), ``${env:NAME,default}`` with a fallback.
    A string that is exactly one ``${key}`` takes the referenced value's type (a number stays a number).
    """
    problems: list[str] = []
    unresolved: set[str] = set()

    def lookup(dotted: str, chain: tuple[str, ...]) -> Any:
        if dotted in chain:
            cycle = " -> ".join(f"${{{key}}}" for key in (*chain[chain.index(dotted) :], dotted))
            raise _Unresolved(
                f"references form a cycle ({cycle}); give one of them a literal value",
                dependent=dotted != chain[0],  # this key only leads into a cycle of others
                cycle=True,
            )
        node: Any = raw
        for part in dotted.split("."):
            if isinstance(node, dict) and part in node and node[part] is not None:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _Unresolved(
                    f"${{{dotted}}} names no key set in this config; set {dotted} in the file or as an "
                    f"override ({dotted}=...), or fix the name"
                )
        if isinstance(node, dict | list):
            raise _Unresolved(f"${{{dotted}}} is a section, not a value; reference one of its keys")
        try:
            return resolve(node, (*chain, dotted))
        except _Unresolved as error:
            if error.cycle:
                raise
            raise _Unresolved(str(error), dependent=True) from None

    def evaluate(expression: str, chain: tuple[str, ...]) -> Any:
        expression = expression.strip()
        kind, colon, rest = expression.partition(":")
        if colon and kind.strip() == "env":
            name, comma, default = rest.partition(",")
            name = name.strip()
            if not _ENV_NAME.fullmatch(name):
                raise _Unresolved(f"${{{expression}}}: {name!r} is not an environment variable name")
            if name in os.environ:
                return os.environ[name]
            if comma:
                return default.strip()
            raise _Unresolved(
                f"environment variable {name} is not set; export {name}=... before running, or give a "
                f"default: ${{env:{name},VALUE}}"
            )
        if colon:
            raise _Unresolved(
                f"${{{expression}}}: unknown resolver {kind.strip()!r}; use ${{env:NAME}}, "
                "${env:NAME,default} or ${section.key}"
            )
        if not expression:
            raise _Unresolved("empty ${}; write ${section.key} or ${env:NAME}")
        return lookup(expression, chain)

    def resolve(value: Any, chain: tuple[str, ...]) -> Any:
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REFERENCE.fullmatch(value)
        if whole and whole.group(1) is not None:
            return evaluate(whole.group(1), chain)

        def substitute(match: re.Match[str]) -> str:
            if match.group(1) is None:
                return "${"
            found = evaluate(match.group(1), chain)
            return found if isinstance(found, str) else yaml.safe_dump(found).removesuffix("\n...\n").strip()

        return _REFERENCE.sub(substitute, value)

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {name: walk(item, f"{key}.{name}" if key else str(name)) for name, item in node.items()}
        if isinstance(node, list):
            return [walk(item, f"{key}.{index}") for index, item in enumerate(node)]
        try:
            return resolve(node, (key,))
        except _Unresolved as error:
            unresolved.add(key)
            if not error.dependent:
                problems.append(f"{key} = {node!r}: {error}")
            return node

    return walk(raw, ""), problems, unresolved


def dump_config(config: LlavaRayConfig) -> str:
    """The resolved config as YAML, every default spelled out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten_config(config: LlavaRayConfig) -> dict[str, Any]:
    """``{"train.learning_rate": 0.001, ...}`` for MLflow params and result tables."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat


def describe_error(error: dict[str, Any], root: type[BaseModel] | None = None) -> str:
    """One line for one pydantic error: the dotted key, the value and the fix.

    ``root`` is the model validated (default: :class:`LlavaRayConfig`), for naming valid keys.
    """
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key. {_unknown_key_fix(loc, root or LlavaRayConfig)}"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, dict):  # a whole section: its keys are named in the message
        return f"{key}: {message}"
    return f"{key} = {value!r}: {message}"


def _unknown_key_fix(loc: list[str], root: type[BaseModel]) -> str:
    """Suggest the closest valid key of the section the unknown key sits in."""
    model: type[BaseModel] | None = root
    skip_key = False
    for part in loc[:-1]:
        if model is None or part.isdigit() or skip_key:
            skip_key = False
            continue
        field = model.model_fields.get(part)
        model = _section_model(field.annotation) if field else None
        skip_key = field is not None and typing.get_origin(field.annotation) is dict  # next: a free-form key
    if model is None:
        return "Remove it."
    valid = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    return f"{hint}Valid keys here: {', '.join(valid)}."


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind a field annotation such as ``Section`` or ``list[Section]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_model(arg)
        if found is not None:
            return found
    return None

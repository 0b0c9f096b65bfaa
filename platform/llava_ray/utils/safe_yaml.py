"""The one way llava-ray reads YAML that a user wrote: configs, sweeps, pipelines, prompts, override values.

PyYAML's ``safe_load`` builds no objects, but it still follows aliases: a "billion laughs" file
(each anchor a list of nine aliases of the one before) is a few hundred bytes that expand to 10^9
values as soon as anything walks them (pydantic validating ``model.vision_config_overrides``,
a deep copy, a dump), and validation hangs while memory grows. :func:`load_yaml` refuses:

- aliases (``*name``, including ``<<: *name`` merges): write the value out instead;
- nesting deeper than :data:`MAX_YAML_DEPTH` (past Python's recursion limit PyYAML would crash);
- text over :data:`MAX_YAML_BYTES` (a config is a few KiB; files are checked by size before reading).

Each refusal, and any syntax error, is a :class:`YamlError` (a ``yaml.YAMLError``) with a one-line
message that names where and what to do; ``config.loader`` turns it into a ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20  # 1 MiB
MAX_YAML_DEPTH = 64


class YamlError(yaml.YAMLError):
    """YAML that llava-ray will not read; the message is one line with the fix."""


class YamlLimitError(YamlError):
    """Well-formed YAML over a limit: an alias, too deep, too large."""


class _LimitedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and deep nesting while composing the node tree."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlLimitError(
                f"line {event.start_mark.line + 1}: alias *{event.anchor} refused (YAML anchors and aliases "
                "are not allowed: they can expand exponentially); write the value out"
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlLimitError(
                    f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep; flatten the value"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str) -> Any:
    """Parse ``text`` as YAML with the limits above; raises :class:`YamlError` with a one-line message."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise YamlLimitError(f"{size} bytes, over the {MAX_YAML_BYTES} bytes llava-ray reads; shorten it")
    try:
        return yaml.load(text, Loader=_LimitedSafeLoader)  # a SafeLoader subclass: plain data only
    except YamlError:
        raise
    except yaml.MarkedYAMLError as error:
        raise YamlError(describe_yaml_error(error)) from None
    except yaml.YAMLError as error:
        raise YamlError(" ".join(str(error).split())) from None


def read_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file, checking its size before reading it."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise YamlLimitError(f"{size} bytes, over the {MAX_YAML_BYTES} bytes llava-ray reads; shorten it")
    return load_yaml(path.read_text(encoding="utf-8"))


def describe_yaml_error(error: yaml.MarkedYAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = " ".join(part for part in (error.context, error.problem) if part)
    return f"{where}{what or 'invalid YAML'}"

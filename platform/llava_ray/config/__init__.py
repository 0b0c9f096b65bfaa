"""Typed configuration: schema, YAML loading, overrides and validation."""

from llava_ray.config.loader import ConfigError, dump_config, flatten_config, load_config, validate_config
from llava_ray.config.schema import LlavaRayConfig

__all__ = ["ConfigError", "LlavaRayConfig", "dump_config", "flatten_config", "load_config", "validate_config"]

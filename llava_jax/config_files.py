"""Load a Python config file (`configs/X.py[:ARG]`) for the commands that do not use absl flags.

`llava-jax train` reads the same files through ml_collections config_flags; this is the equivalent
for `info` and `aot`: the file's get_config(ARG) (or get_config() without an argument).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from llava_jax.validate import ConfigError, NotAFolder


class ConfigFileNotFound(NotAFolder):
    """--config names a file that does not exist (a UserError and a FileNotFoundError)."""


class NotAConfigFile(ConfigError, AttributeError):
    """--config names a Python file without get_config(arg)."""


def split_spec(spec: str) -> tuple[str, str | None]:
    """'configs/x.py:stage1' -> ('configs/x.py', 'stage1'); the argument is optional."""
    path, sep, arg = spec.partition(".py:")
    if sep:
        return path + ".py", arg
    return spec, None


def load_config(spec: str) -> ml_collections.ConfigDict:
    path, arg = split_spec(spec)
    if not os.path.isfile(path):
        raise ConfigFileNotFound(f"config file {path!r} not found (from --config {spec!r}); the configs are in "
                                 "the repository's configs/ folder, e.g. configs/tiny.py:stage2")
    name = "llava_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise NotAConfigFile(f"config file {path!r} defines no get_config(arg)")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except (ValueError, KeyError) as e:  # the config file refuses its argument (e.g. ':stage3')
        raise ConfigError(f"--config {spec}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"get_config() in {path!r} returned {type(config).__name__}, expected a ConfigDict")
    return config

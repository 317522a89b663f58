"""Experiment configuration: YAML file + dotted overrides -> a checked `ExperimentConfig`."""

from __future__ import annotations

import os
from typing import Iterable

import yaml

from mmoe_megatron.config.base import ConfigError, apply_override, from_dict, to_dict
from mmoe_megatron.config.schema import (
    BlendEntry,
    CheckpointConfig,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    MatryoshkaConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "BlendEntry",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LoggingConfig",
    "MatryoshkaConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainConfig",
    "as_written",
    "config_from_dict",
    "dump_config",
    "load_config",
    "override_args",
    "parse_overrides",
    "save_config",
]


def parse_overrides(args: Iterable[str]) -> list[tuple[str, object]]:
    """`["--train.lr=3e-4", "--moe.num_experts", "16"]` -> [("train.lr", ...), ...].

    Values are parsed as YAML, so `true`, `null`, `[1, 2]` and numbers keep their types.
    """
    out: list[tuple[str, object]] = []
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError("", f"expected an override like --section.field=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(key, f"override --{key} has no value; write --{key}=VALUE")
            i += 1
            value = args[i]
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        out.append((key, parsed))
        i += 1
    return out


def override_args(overrides: Iterable[tuple[str, object]]) -> list[str]:
    """The command-line form of (key, value) overrides, which `parse_overrides` reads back: strings
    as written, other values as JSON (which YAML parses to the same types)."""
    import json

    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides]


def config_from_dict(data: dict, overrides: Iterable[tuple[str, object]] = ()) -> ExperimentConfig:
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy, plain types only
    for key, value in overrides:
        apply_override(data, key, value)
    return from_dict(ExperimentConfig, data).check()


def load_config(path: str, overrides: Iterable[tuple[str, object]] = ()) -> ExperimentConfig:
    if not os.path.isfile(path):
        raise ConfigError("", f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError("", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping with sections such as model, moe, train")
    return config_from_dict(data, overrides)


def as_written(cfg: ExperimentConfig) -> dict:
    """The config's plain data with every setting that was `auto` written as auto again, so that
    it resolves for the model it ends up configuring: an elastic run's config overridden to a
    fixed-k specialist trains full-width experts without gate temperatures, as that specialist's
    own config would."""
    data = to_dict(cfg)
    for name in cfg.matryoshka.resolved_auto:
        data["matryoshka"][name] = "auto"
    return data


def save_config(cfg: ExperimentConfig, path: str) -> None:
    """Write the config, `auto` settings as auto (`as_written`), every other field resolved;
    `load_config(path)` gives back an equal config."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(as_written(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def dump_config(cfg: ExperimentConfig) -> str:
    """Every field as it trains (`auto` settings resolved)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

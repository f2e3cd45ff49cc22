"""Typed, frozen configuration schemas (pydantic, ``extra="forbid"``): a typo in a config key is an error."""

from nemo_quagmire.config.model import (
    MODEL_PRESETS,
    ModelConfig,
    ParameterCount,
    count_parameters,
    get_model_preset,
)

__all__ = ["MODEL_PRESETS", "ModelConfig", "ParameterCount", "count_parameters", "get_model_preset"]

"""Write tests/fixtures/interop/diffusers_config_spec.json: what diffusers accepts in the files
lpo writes into a model folder, read from diffusers itself.

    pip install diffusers==0.42.1 torch transformers
    python tests/interop/make_diffusers_config_spec.py

- For `UNet2DConditionModel` and `AutoencoderKL`: every `config.json` key (the `__init__`
  parameters) with its default and the JSON types its annotation allows ("integer" for `int`,
  "number" for `float`, "array" for tuples and lists, "null" for `None`, ...). A `null` where the
  annotation has no `None` is what made diffusers fail with a TypeError on `only_cross_attention`.
- For `StableDiffusionPipeline` and `StableDiffusionXLPipeline`: the components
  `model_index.json` lists, those allowed to be `[null, null]` (`_optional_components`), and the
  pipeline's own config keys with their defaults.

tests/interop_model_folder.rs checks lpo's writers against this file.
"""

import inspect
import json
import pathlib
import types
import typing

import diffusers
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "interop" / "diffusers_config_spec.json"
JSON_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    tuple: "array",
    list: "array",
    dict: "object",
    type(None): "null",
}


def json_types(annotation):
    """The JSON value types a parameter annotation allows."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return sorted({t for arg in typing.get_args(annotation) for t in json_types(arg)})
    if origin is not None:
        return [JSON_TYPES[origin]]
    if annotation in JSON_TYPES:
        return [JSON_TYPES[annotation]]
    raise ValueError(f"no JSON type for annotation {annotation!r}")


def to_json(value):
    return list(value) if isinstance(value, tuple) else value


def model_spec(cls):
    spec = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        spec[name] = {"default": to_json(param.default), "types": json_types(param.annotation)}
    return spec


def pipeline_spec(cls):
    components, config_keys = cls._get_signature_keys(cls)
    params = inspect.signature(cls.__init__).parameters
    return {
        "components": sorted(components),
        "optional_components": sorted(cls._optional_components),
        "config": {k: params[k].default for k in sorted(config_keys)},
    }


def main():
    spec = {
        "diffusers_version": diffusers.__version__,
        "models": {cls.__name__: model_spec(cls) for cls in (UNet2DConditionModel, AutoencoderKL)},
        "pipelines": {
            cls.__name__: pipeline_spec(cls)
            for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Hub configs: one JSON file per published variant (`hub_configs/*.json`), checked against one JSON Schema
(`hub_config.schema.json`, shipped with the package) and then against the classes the values go to."""

import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("hub_config.schema.json")
# TrainingArguments fields a hub config may not set: the output folder is the caller's, and publishing goes
# through upload staging (model card, remote code), not the Trainer's own push.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
RESERVED_ARGUMENTS = ("output_dir", "push_to_hub", "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo")


class HubConfigError(ValueError):
    """A hub config file that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """A validated hub config. `maccap` holds MacCapConfig fields, `training_arguments` TrainingArguments fields."""

    path: Path
    repo_id: str
    model_name: str
    license: str
    license_name: str | None
    license_link: str | None
    clip: str
    lm: str
    maccap: dict
    dataset: dict
    max_caption_length: int
    finetune_lm: bool
    training_arguments: dict

    def dataset_file(self):
        """The corpus file, relative paths taken from the hub config's folder; None for a Hub dataset."""
        if "file" not in self.dataset:
            return None
        return (self.path.parent / self.dataset["file"]).resolve()

    @property
    def dataset_ids(self):
        """Hub dataset ids of the training corpus (for the model card); empty for a local file."""
        return [self.dataset["hub_id"]] if "hub_id" in self.dataset else []


def _field_path(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _json_type_ok(value, annotation):
    """Whether a JSON value fits a TrainingArguments annotation (`float`, `int | None`, `dict | str`, an enum...)."""
    options = typing.get_args(annotation) or (annotation,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if isinstance(origin, type) and origin not in (float, int, type(None)) and isinstance(value, origin):
            return True
    return False


def check_training_arguments(path, arguments):
    """TrainingArguments does not check types itself: do it from its annotations, then let it check values."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for name, value in arguments.items():
        if name in RESERVED_ARGUMENTS:
            raise HubConfigError(f"{path}: training.arguments.{name}: set by maccap train / upload, not here")
        if name not in known:
            raise HubConfigError(f"{path}: training.arguments.{name}: not a transformers.TrainingArguments field")
        if not _json_type_ok(value, hints[name]):
            raise HubConfigError(f"{path}: training.arguments.{name}: {value!r} is not of type {hints[name]}")
    # Under torchrun the check would set up the process group as a side effect: keep it a check of values.
    launcher = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    try:
        TrainingArguments(output_dir=tempfile.gettempdir(), **arguments)
    except (ValueError, TypeError) as error:
        raise HubConfigError(f"{path}: training.arguments: {error}") from None
    finally:
        os.environ.update(launcher)


def load_hub_config(path):
    """Read, validate and return a `HubConfig`. Raises `HubConfigError` naming the file and the field."""
    import jsonschema

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise HubConfigError(f"cannot read hub config {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubConfigError(f"{path}: not valid JSON: {error}") from None

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(e.absolute_path), e.message))
    if errors:
        # best_match picks the most specific error (e.g. inside a oneOf) when there are several.
        error = jsonschema.exceptions.best_match(errors)
        # "x-error" in the schema replaces messages that would only dump the object (oneOf over its forms).
        message = error.schema.get("x-error", error.message) if error.validator in ("oneOf", "anyOf") else error.message
        raise HubConfigError(f"{path}: {_field_path(error)}: {message}")

    arguments = data["training"]["arguments"]
    check_training_arguments(path, arguments)
    if data["dataset"].get("validation_split") and "file" in data["dataset"]:
        raise HubConfigError(f"{path}: dataset.validation_split: only for a Hub dataset; use validation_fraction")

    return HubConfig(
        path=path.resolve(),
        repo_id=data["repo_id"],
        model_name=data["model_name"],
        license=data["license"],
        license_name=data.get("license_name"),
        license_link=data.get("license_link"),
        clip=data["components"]["clip"],
        lm=data["components"]["lm"],
        maccap=dict(data["maccap"]),
        dataset=dict(data["dataset"]),
        max_caption_length=data["training"].get("max_caption_length", 25),
        finetune_lm=data["training"].get("finetune_lm", False),
        training_arguments=dict(arguments),
    )

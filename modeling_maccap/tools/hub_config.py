"""Hub configs: one JSON file per published variant (`hub_configs/*.json`), checked against one JSON Schema
(`hub_config.schema.json`, shipped with the package) and then against the classes the values go to.

A file has four sections: `hub` (the repo and its card's metadata), `architecture` (the component checkpoints and
the MacCapConfig values that differ from its defaults), `corpus` (the captions) and `training`."""

import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path

from .errors import MacCapError, listing, read_json

SCHEMA_PATH = Path(__file__).with_name("hub_config.schema.json")
# TrainingArguments fields a hub config may not set: the output folder is the caller's, and publishing goes
# through upload staging (model card, remote code), not the Trainer's own push.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
RESERVED_ARGUMENTS = ("output_dir", "push_to_hub", "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo")
SUB_CONFIGS = ("clip_config", "text_config")  # MacCapConfig fields that come from the components, not from here


def maccap_defaults():
    """MacCapConfig's own fields, the sub-configs excepted, with their defaults (the paper's method)."""
    from ..configuration_maccap import MacCapConfig

    return {f.name: f.default for f in dataclasses.fields(MacCapConfig)
            if f.name in MacCapConfig.__annotations__ and f.name not in SUB_CONFIGS}


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """A validated hub config. `maccap` holds the MacCapConfig fields it sets (`maccap_settings` all of them),
    `corpus` the caption corpus, `training_arguments` TrainingArguments fields."""

    path: Path
    repo_id: str
    model_name: str
    license: str
    license_name: str | None
    license_link: str | None
    clip: str
    lm: str
    maccap: dict
    corpus: dict
    max_caption_length: int
    finetune_lm: bool
    training_arguments: dict
    recipe: dict = dataclasses.field(default_factory=dict)  # training.recipe: the recipe and its settings (recipes.py)

    @property
    def maccap_settings(self):
        """Every MacCapConfig field of the variant (the sub-configs excepted): its value here, else the default."""
        return {**maccap_defaults(), **self.maccap}

    def corpus_file(self):
        """The corpus file, relative paths taken from the hub config's folder; None for a Hub dataset."""
        if "file" not in self.corpus:
            return None
        return (self.path.parent / self.corpus["file"]).resolve()

    @property
    def dataset_ids(self):
        """Hub dataset ids of the training corpus (for the model card); empty for a local file."""
        return [self.corpus["hub_id"]] if "hub_id" in self.corpus else []


def _field_path(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def check_schema(path, data):
    """The layout and the values the schema knows; the first error, most specific first, naming the field."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(e.absolute_path), e.message))
    if errors:
        # best_match picks the most specific error (e.g. inside a oneOf) when there are several.
        error = jsonschema.exceptions.best_match(errors)
        # "x-error" in the schema replaces messages that would only dump the object (oneOf over its forms).
        message = error.schema.get("x-error", error.message) if error.validator in ("oneOf", "anyOf") else error.message
        raise MacCapError(f"{path}: {_field_path(error)}: {message}")


def check_maccap(path, overrides):
    """MacCapConfig checks the values itself (types and ranges); the names are checked here, since it would keep an
    unknown keyword as an attribute."""
    from huggingface_hub.errors import StrictDataclassError

    from ..configuration_maccap import MacCapConfig

    fields = maccap_defaults()
    for name in overrides:
        if name not in fields:
            raise MacCapError(f"{path}: architecture.maccap.{name}: not a MacCapConfig setting; the settings are "
                              f"{listing(fields)}")
    try:
        MacCapConfig(**overrides)
    except StrictDataclassError as error:
        raise MacCapError(f"{path}: architecture.maccap: {error.__cause__ or error}") from None


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
            raise MacCapError(f"{path}: training.arguments.{name}: set by maccap train / upload, not here")
        if name not in known:
            raise MacCapError(f"{path}: training.arguments.{name}: not a transformers.TrainingArguments field")
        if not _json_type_ok(value, hints[name]):
            raise MacCapError(f"{path}: training.arguments.{name}: {value!r} is not of type {hints[name]}")
    # Under torchrun the check would set up the process group as a side effect: keep it a check of values.
    launcher = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    try:
        TrainingArguments(output_dir=tempfile.gettempdir(), **arguments)
    except (ValueError, TypeError) as error:
        raise MacCapError(f"{path}: training.arguments: {error}") from None
    finally:
        os.environ.update(launcher)


def load_hub_config(path):
    """Read, validate and return a `HubConfig`. Raises `MacCapError` naming the file and the field."""
    path = Path(path)
    data = read_json(path, "hub config")
    check_schema(path, data)
    hub, architecture, corpus, training = (data[name] for name in ("hub", "architecture", "corpus", "training"))
    maccap = architecture.get("maccap", {})
    check_maccap(path, maccap)
    check_training_arguments(path, training["arguments"])
    if corpus.get("validation_split") and "file" in corpus:
        raise MacCapError(f"{path}: corpus.validation_split: only for a Hub dataset; use validation_fraction")

    return HubConfig(
        path=path.resolve(),
        repo_id=hub["repo_id"],
        model_name=hub["model_name"],
        license=hub["license"],
        license_name=hub.get("license_name"),
        license_link=hub.get("license_link"),
        clip=architecture["components"]["clip"],
        lm=architecture["components"]["lm"],
        maccap=dict(maccap),
        corpus=dict(corpus),
        max_caption_length=training.get("max_caption_length", 25),
        finetune_lm=training.get("finetune_lm", False),
        training_arguments=dict(training["arguments"]),
        recipe=_check_recipe(path, training.get("recipe", {})),
    )


def _check_recipe(path, recipe):
    """training.recipe as written (paths relative to the hub config), after `recipes.recipe_from_dict` checks it."""
    if recipe:
        from .recipes import recipe_from_dict

        recipe_from_dict(recipe, f"{path}: training.recipe", relative_to=path.parent)
    return dict(recipe)

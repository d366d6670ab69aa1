"""hub_configs/*.json: every published variant passes one schema, builds a model, and follows the paper's recipe;
a broken file fails with the file and the field in the message."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from modeling_maccap import MacCapConfig, MacCapForConditionalGeneration
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.hub_config import SCHEMA_PATH, load_hub_config

HUB_CONFIGS = sorted((Path(__file__).parent.parent / "hub_configs").glob("*.json"))
MACCAP_FIELDS = [f.name for f in dataclasses.fields(MacCapConfig)
                 if f.name in MacCapConfig.__annotations__ and f.name not in ("clip_config", "text_config")]
DEFAULTS = MacCapConfig()


def read(path):
    return json.loads(Path(path).read_text())


def test_the_four_published_variants_are_there():
    variants = {(d["architecture"]["components"]["clip"], d["architecture"]["components"]["lm"],
                 d["corpus"].get("hub_id")) for d in map(read, HUB_CONFIGS)}
    coco, cc3m = "yerevann/coco-karpathy", "google-research-datasets/conceptual_captions"
    assert variants >= {
        ("openai/clip-vit-base-patch32", "openai-community/gpt2", coco),
        ("openai/clip-vit-base-patch32", "openai-community/gpt2", cc3m),
        ("openai/clip-vit-large-patch14", "openai-community/gpt2-medium", cc3m),
        ("openai/clip-vit-base-patch32", "facebook/opt-1.3b", coco),  # the paper's own setting
    }
    assert len({read(p)["hub"]["repo_id"] for p in HUB_CONFIGS}) == len(HUB_CONFIGS)


def test_maccap_config_alone_lists_the_method_fields(tmp_path):
    """The schema names no MacCapConfig field: the loader takes every field MacCapConfig has, and only those."""
    assert read(SCHEMA_PATH)["properties"]["architecture"]["properties"]["maccap"].keys() <= {"type", "description"}
    every = {name: getattr(DEFAULTS, name) for name in MACCAP_FIELDS}
    hub = load_hub_config(_broken(tmp_path, _set("architecture", "maccap", value=every)))
    assert hub.maccap == every and hub.maccap_settings == every


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.stem)
def test_each_variant_sets_only_what_differs_from_maccap_config(path):
    overrides = read(path)["architecture"].get("maccap", {})
    assert {name: value for name, value in overrides.items() if value == getattr(DEFAULTS, name)} == {}


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.stem)
def test_each_variant_loads_and_builds_a_model_with_tiny_stand_ins(path, components):
    raw = read(path)
    hub = load_hub_config(path)
    assert hub.repo_id == raw["hub"]["repo_id"]
    assert (hub.clip, hub.lm) == (raw["architecture"]["components"]["clip"], raw["architecture"]["components"]["lm"])
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=components[1],
                                                                      **hub.maccap)
    overrides = raw["architecture"].get("maccap", {})
    settings = {name: overrides.get(name, getattr(DEFAULTS, name)) for name in MACCAP_FIELDS}
    assert hub.maccap_settings == settings
    for name in MACCAP_FIELDS:
        assert getattr(model.config, name) == settings[name], name
    assert model.projector.queries.weight.shape[0] == settings["num_queries"]
    assert len(model.projector.layers) == settings["aligner_layers"]


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.stem)
def test_each_variant_trains_with_the_papers_optimisation(path):
    """method.md: AdamW 1e-4, weight decay 0.01, 200 warm-up steps from 1% of lr, cosine to 10% of lr, clip 1.0,
    batch 32, 8 epochs on COCO / 4 on CC3M, 25 caption tokens, LM frozen."""
    hub = load_hub_config(path)
    args = hub.training_arguments
    assert (args["learning_rate"], args["weight_decay"], args["warmup_steps"], args["max_grad_norm"]) == (1e-4, 0.01, 200, 1.0)
    assert args["lr_scheduler_type"] == "cosine_warmup_with_min_lr"
    assert args["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1, "warmup_lr_rate": 0.01}
    assert args["per_device_train_batch_size"] == 32
    assert args["num_train_epochs"] == (8 if "coco" in hub.corpus["hub_id"] else 4)
    assert hub.max_caption_length == 25 and hub.finetune_lm is False


def _broken(tmp_path, edit):
    data = copy.deepcopy(read(HUB_CONFIGS[0]))
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


def _set(*keys, value):
    def edit(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value
    return edit


def _delete(*keys):
    def edit(data):
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]
    return edit


@pytest.mark.parametrize("edit, field, reason", [
    (_delete("hub"), "(top level)", "'hub' is a required property"),
    (_delete("hub", "repo_id"), "hub", "'repo_id' is a required property"),
    (_set("hub", "repo_id", value="no-organisation"), "hub.repo_id", "does not match"),
    (_set("repo_id", value="org/name"), "(top level)", "'repo_id' was unexpected"),
    (_set("architecture", "maccap", "num_queries", value=0), "architecture.maccap", "num_queries must be >= 1, got 0"),
    (_set("architecture", "maccap", "num_queries", value="32"), "architecture.maccap",
     "Field 'num_queries' expected int, got str"),
    (_set("architecture", "maccap", "subregion_mode", value="patches"), "architecture.maccap",
     "subregion_mode must be one of ('attention', 'cls'), got 'patches'"),
    (_set("architecture", "maccap", "noise", value=0.1), "architecture.maccap.noise",
     "not a MacCapConfig setting; the settings are num_queries, aligner_layers"),
    (_set("architecture", "maccap", value=[]), "architecture.maccap", "is not of type 'object'"),
    (_set("architecture", "maccap", "vqa_prompt", value="Q: A:"), "architecture.maccap",
     "vqa_prompt must contain '{question}'"),
    (_set("corpus", "file", value="captions.json"), "corpus", "either hub_id + split + column"),
    (_delete("corpus", "column"), "corpus", "either hub_id + split + column"),
    (_set("architecture", "components", "clip", value=""), "architecture.components.clip", "should be non-empty"),
    (_set("training", "arguments", "learning_rate", value="fast"), "training.arguments.learning_rate",
     "'fast' is not of type <class 'float'>"),
    (_set("training", "arguments", "learning_rat", value=1e-4), "training.arguments.learning_rat",
     "not a transformers.TrainingArguments field"),
    (_set("training", "arguments", "output_dir", value="x"), "training.arguments.output_dir", "not here"),
    (_set("training", "arguments", "lr_scheduler_type", value="cosinus"), "training.arguments",
     "cosinus is not a valid SchedulerType"),
    (_set("training", "max_caption_length", value=0), "training.max_caption_length", "less than the minimum"),
])
def test_an_invalid_file_names_the_file_and_the_field(tmp_path, edit, field, reason):
    path = _broken(tmp_path, edit)
    with pytest.raises(MacCapError) as error:
        load_hub_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert reason in message, message


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(MacCapError, match="hub config .*missing.json: no such file"):
        load_hub_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"hub": ')
    with pytest.raises(MacCapError, match="bad.json: not JSON"):
        load_hub_config(bad)

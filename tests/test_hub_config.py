"""hub_configs/*.json: every published variant passes one schema, builds a model, and follows the paper's recipe;
a broken file fails with the file and the field in the message."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from modeling_maccap import MacCapConfig, MacCapForConditionalGeneration
from modeling_maccap.tools.hub_config import SCHEMA_PATH, HubConfigError, load_hub_config

HUB_CONFIGS = sorted((Path(__file__).parent.parent / "hub_configs").glob("*.json"))
MACCAP_FIELDS = [f.name for f in dataclasses.fields(MacCapConfig)
                 if f.name in MacCapConfig.__annotations__ and f.name not in ("clip_config", "text_config")]


def read(path):
    return json.loads(Path(path).read_text())


def test_the_four_published_variants_are_there():
    variants = {(d["components"]["clip"], d["components"]["lm"], d["dataset"].get("hub_id")) for d in map(read, HUB_CONFIGS)}
    coco, cc3m = "yerevann/coco-karpathy", "google-research-datasets/conceptual_captions"
    assert variants >= {
        ("openai/clip-vit-base-patch32", "openai-community/gpt2", coco),
        ("openai/clip-vit-base-patch32", "openai-community/gpt2", cc3m),
        ("openai/clip-vit-large-patch14", "openai-community/gpt2-medium", cc3m),
        ("openai/clip-vit-base-patch32", "facebook/opt-1.3b", coco),  # the paper's own setting
    }
    assert len({read(p)["repo_id"] for p in HUB_CONFIGS}) == len(HUB_CONFIGS)


def test_schema_lists_every_maccap_config_field_and_requires_it():
    maccap = read(SCHEMA_PATH)["properties"]["maccap"]
    assert sorted(maccap["properties"]) == sorted(MACCAP_FIELDS)
    assert sorted(maccap["required"]) == sorted(MACCAP_FIELDS)


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.stem)
def test_each_variant_loads_and_builds_a_model_with_tiny_stand_ins(path, components):
    raw = read(path)
    hub = load_hub_config(path)
    assert hub.repo_id == raw["repo_id"] and (hub.clip, hub.lm) == (raw["components"]["clip"], raw["components"]["lm"])
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=components[1],
                                                                      **hub.maccap)
    for name in MACCAP_FIELDS:
        assert getattr(model.config, name) == raw["maccap"][name], name
    assert model.projector.queries.weight.shape[0] == raw["maccap"]["num_queries"]
    assert len(model.projector.layers) == raw["maccap"]["aligner_layers"]


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
    assert args["num_train_epochs"] == (8 if "coco" in hub.dataset["hub_id"] else 4)
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
    (_delete("repo_id"), "(top level)", "'repo_id' is a required property"),
    (_set("repo_id", value="no-organisation"), "repo_id", "does not match"),
    (_set("maccap", "num_queries", value=0), "maccap.num_queries", "less than the minimum of 1"),
    (_set("maccap", "num_queries", value="32"), "maccap.num_queries", "is not of type 'integer'"),
    (_set("maccap", "subregion_mode", value="patches"), "maccap.subregion_mode", "'patches' is not one of"),
    (_set("maccap", "noise", value=0.1), "maccap", "'noise' was unexpected"),
    (_delete("maccap", "rerank"), "maccap", "'rerank' is a required property"),
    (_set("maccap", "vqa_prompt", value="Q: A:"), "maccap.vqa_prompt", "does not match"),
    (_set("dataset", "file", value="captions.json"), "dataset", "either hub_id + split + column"),
    (_delete("dataset", "column"), "dataset", "either hub_id + split + column"),
    (_set("components", "clip", value=""), "components.clip", "should be non-empty"),
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
    with pytest.raises(HubConfigError) as error:
        load_hub_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert reason in message, message


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(HubConfigError, match="cannot read hub config .*missing.json"):
        load_hub_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"repo_id": ')
    with pytest.raises(HubConfigError, match="bad.json: not valid JSON"):
        load_hub_config(bad)

"""MacCapConfig: the paper's defaults, round trips, and one clear error per bad value."""

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPConfig, GPT2Config, OPTConfig

from modeling_maccap import MacCapConfig


def test_defaults_are_the_reference_setting_of_method_md():
    c = MacCapConfig()
    assert (c.num_queries, c.aligner_layers, c.aligner_heads, c.aligner_ffn_dim, c.aligner_dropout) == (32, 1, 8, 2048, 0.1)
    assert (c.num_subregions, c.subregion_mode, c.subregion_temperature, c.patch_weight) == (10, "attention", 1.0, 1.0)
    assert (c.train_noise_variance, c.inference_noise_variance) == (0.016, 0.016)
    assert (c.num_candidates, c.rerank, c.rerank_max_characters) == (4, True, None)
    assert c.vqa_prompt == "Question: {question} Short answer:"
    assert isinstance(c.clip_config, CLIPConfig) and isinstance(c.text_config, GPT2Config)
    assert c.projector_dim == 512  # CLIP ViT-B/32's joint space


def test_every_field_round_trips_through_save_and_load(tmp_path):
    values = dict(num_queries=7, aligner_layers=2, aligner_heads=4, aligner_ffn_dim=96, aligner_dropout=0.2,
                  num_subregions=5, subregion_mode="cls", subregion_temperature=0.5, patch_weight=0.25,
                  train_noise_variance=0.01, inference_noise_variance=0.02, num_candidates=6, rerank=False,
                  vqa_prompt="Q: {question} A:")
    MacCapConfig(text_config=OPTConfig(hidden_size=64), **values).save_pretrained(tmp_path)
    loaded = MacCapConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in values} == values
    assert isinstance(loaded.text_config, OPTConfig) and loaded.text_config.hidden_size == 64
    assert MacCapConfig.from_dict(loaded.to_dict()).to_dict() == loaded.to_dict()


def test_text_config_takes_any_causal_lm_from_a_dict():
    c = MacCapConfig(text_config={"model_type": "opt", "hidden_size": 48})
    assert isinstance(c.text_config, OPTConfig) and c.text_config.hidden_size == 48


def test_sub_configs_keep_sdpa_attention():
    c = MacCapConfig(clip_config=CLIPConfig(), text_config=GPT2Config())
    assert c.text_config._attn_implementation == "sdpa"
    assert c.clip_config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(subregion_mode="grid"), "subregion_mode must be one of"),
        (dict(text_config={"model_type": "clip_text_model"}), "text_config must be the config of a causal LM"),
        (dict(text_config={"model_type": "t5"}), "text_config must be the config of a causal LM"),
        (dict(num_subregions=0), "num_subregions must be >= 1"),
        (dict(train_noise_variance=-0.1), "train_noise_variance must be >= 0"),
        (dict(subregion_temperature=0.0), "subregion_temperature must be > 0"),
        (dict(rerank_max_characters=0), "rerank_max_characters must be >= 1 or None"),
        (dict(vqa_prompt="no placeholder"), "vqa_prompt must contain"),
        (dict(num_queries="32"), "num_queries"),
    ],
)
def test_bad_values_give_one_clear_error_naming_the_field(kwargs, message):
    # transformers configs are strict dataclasses: their error names the field or validator and the cause.
    with pytest.raises(StrictDataclassError, match=message):
        MacCapConfig(**kwargs)

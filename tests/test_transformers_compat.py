"""Each transformers detail that transformers_compat fences, checked against the installed transformers: when an
upgrade moves one, its test here fails (and names it), instead of `generate` silently taking a slow path."""

import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, Cache, CLIPModel, GenerationConfig, Pipeline

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap import modeling_maccap as modeling
from modeling_maccap import transformers_compat as compat

from .conftest import random_image


@pytest.fixture
def lm(components):
    return AutoModelForCausalLM.from_pretrained(components[1]).eval()


# ---------------------------------------------------------------------------------------- the version floor
@pytest.mark.parametrize("version", ["5.22.2", "5.0.0", "4.57.6", "5.22.99.dev0"])
def test_an_older_transformers_is_refused_naming_the_version_needed(version):
    with pytest.raises(ImportError) as error:
        compat.check_transformers_version(version)
    assert str(error.value) == (f"MacCap needs transformers>=5.23.0, but transformers {version} is installed: "
                                "pip install -U 'transformers>=5.23.0'")


@pytest.mark.parametrize("version", ["5.23.0", "5.23.0rc1", "5.24.0", "5.40.0.dev0", "6.1.0", transformers.__version__])
def test_the_minimum_and_newer_are_accepted(version):
    compat.check_transformers_version(version)


def test_setup_py_and_the_lock_hold_the_same_minimum():
    root = Path(compat.__file__).parents[1]
    major_minor = ".".join(compat.MIN_TRANSFORMERS.split(".")[:2])
    assert f'"transformers>={major_minor},<6"' in (root / "setup.py").read_text(encoding="utf-8")
    assert f"transformers=={compat.MIN_TRANSFORMERS}\n" in (root / "tests" / "requirements-lock.txt").read_text()


OLD_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_maccap"] = None  # the installed package must not be used
    from transformers import AutoConfig, AutoModel, AutoProcessor
    if sys.argv[2] != "real":  # pretend: what an older install reports (on the module these imports left in place)
        sys.modules["transformers"].__version__ = sys.argv[2]
    for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained, AutoProcessor.from_pretrained):
        try:
            load(sys.argv[1], trust_remote_code=True)
            print("loaded")
        except ImportError as error:
            print(f"{type(error).__name__}: {error}")
    """
)


def _load_on(folder, version, pythonpath=""):
    env = {**os.environ, "PYTHONPATH": pythonpath}
    run = subprocess.run([sys.executable, "-c", OLD_LOAD, str(folder), version], capture_output=True, text=True,
                         env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()


def test_a_remote_code_load_on_an_older_transformers_is_one_clear_error(checkpoint):
    expected = ("ImportError: MacCap needs transformers>=5.23.0, but transformers 5.22.2 is installed: "
                "pip install -U 'transformers>=5.23.0'")
    assert _load_on(checkpoint, "5.22.2") == [expected] * 3


@pytest.mark.skipif(not os.environ.get("MACCAP_OLD_TRANSFORMERS"),
                    reason="MACCAP_OLD_TRANSFORMERS (a folder holding transformers 5.22.2) is set by tests/run_matrix.sh")
def test_a_real_older_transformers_stops_at_the_version_check(checkpoint):
    """With transformers 5.22.2 itself installed: nothing in its loader fails before MacCap's check does."""
    lines = _load_on(checkpoint, "real", os.environ["MACCAP_OLD_TRANSFORMERS"])
    assert lines == ["ImportError: MacCap needs transformers>=5.23.0, but transformers 5.22.2 is installed: "
                     "pip install -U 'transformers>=5.23.0'"] * 3


# ------------------------------------------------------------------------------------------ the KV cache
def test_the_lm_takes_and_returns_its_cache_under_one_known_name(lm):
    name = compat.cache_argument(lm.base_model)
    assert name in compat.CACHE_ARGUMENTS
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = lm.base_model(input_ids=ids, use_cache=True)
    cache = getattr(out, name)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 3


def test_a_cache_repeats_each_row_for_its_beams(lm):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cache = getattr(lm.base_model(input_ids=ids, use_cache=True), compat.cache_argument(lm.base_model))
    keys = cache.layers[0].keys.clone()
    cache.batch_repeat_interleave(3)
    assert torch.equal(cache.layers[0].keys, keys.repeat_interleave(3, dim=0))


def test_generate_takes_the_cache_under_that_name_without_a_deprecation(lm):
    name = compat.cache_argument(lm.base_model)
    ids = torch.tensor([[1, 2, 3]])
    cache = getattr(lm.base_model(input_ids=ids[:, :-1], use_cache=True), name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shared = lm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **{name: cache})
    assert not [w for w in caught if name in str(w.message)], [str(w.message) for w in caught]
    assert torch.equal(shared, lm.generate(input_ids=ids, max_new_tokens=4, do_sample=False))


def test_the_completed_generation_config_has_the_lms_defaults(lm):
    """GenerationMixin._prepare_generation_config (private) is how MacCap knows the beams generate will run."""
    lm.generation_config.num_return_sequences = None
    config = compat.completed_generation_config(lm, GenerationConfig(num_beams=3))
    assert config is not None, "transformers no longer has GenerationMixin._prepare_generation_config"
    assert (config.num_beams, config.num_return_sequences, config.use_cache) == (3, 1, True)
    assert config.eos_token_id == lm.generation_config.eos_token_id


def test_the_attention_implementation_switches_inside_the_block_and_back_after(lm, monkeypatch):
    """GPT-2 can switch: inside the block its attention no longer calls torch's SDPA, after the block it does."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        with compat.attention_implementation(lm, "eager", replacing="sdpa") as switched:
            assert switched and lm.config._attn_implementation == "eager"
            inside = lm(ids).logits
        assert not calls and lm.config._attn_implementation == "sdpa"
        after = lm(ids).logits
    assert calls
    torch.testing.assert_close(inside, after, atol=1e-5, rtol=1e-5)


def test_an_attention_other_than_the_one_replaced_is_left_alone(lm):
    lm.set_attn_implementation("eager")
    with compat.attention_implementation(lm, "sdpa", replacing="flash_attention_2") as switched:
        assert not switched and lm.config._attn_implementation == "eager"
    assert lm.config._attn_implementation == "eager"


@pytest.mark.parametrize("num_beams,pad_token_id", [(1, None), (1, 5), (3, 5), (3, None), (3, 0)])
def test_finished_rows_are_padded_with_the_id_generate_uses(lm, num_beams, pad_token_id):
    evens = list(range(0, lm.config.vocab_size, 2))  # every even id ends a row: some rows end early
    torch.manual_seed(0)
    ids = torch.randint(1, lm.config.vocab_size, (6, 3))
    kwargs = dict(num_beams=num_beams, max_new_tokens=8, eos_token_id=[7, *evens], pad_token_id=pad_token_id,
                  do_sample=False)
    out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[:, 3:]
    config = compat.completed_generation_config(lm, GenerationConfig(**kwargs))
    finished = [row for row in out.tolist() if any(t in evens or t == 7 for t in row[:-1])]
    assert finished, "no row ended early"
    expected = compat.generate_pad_id(config)
    for row in finished:
        end = next(i for i, t in enumerate(row) if t == 7 or t in evens)
        assert row[end + 1:] == [expected] * (len(row) - end - 1)


def test_logits_to_keep_returns_the_last_positions_logits(lm):
    assert compat.accepts_argument(lm, "logits_to_keep")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(lm(input_ids=ids, logits_to_keep=2).logits, lm(input_ids=ids).logits[:, -2:])


# ---------------------------------------------------------------------------------------------------- CLIP
def test_clip_last_layer_attention_equals_the_eager_attention(components, processor, images):
    clip = CLIPModel.from_pretrained(components[0], attn_implementation="eager").eval()
    pixel_values = processor(images=images)["pixel_values"]
    with torch.no_grad():
        eager = clip.vision_model(pixel_values=pixel_values, output_attentions=True)
        hidden, attentions = compat.clip_last_layer_attention(clip.vision_model, pixel_values)
    torch.testing.assert_close(hidden, eager.last_hidden_state)
    torch.testing.assert_close(attentions, eager.attentions[-1].mean(1))


def test_auto_model_builds_a_clip_model_with_sdpa_from_its_config(components):
    config = CLIPModel.from_pretrained(components[0]).config
    model = AutoModel.from_config(config)
    assert type(model) is CLIPModel and model.config.vision_config._attn_implementation == "sdpa"


def test_component_paths_do_not_leak_into_the_saved_config(components, tmp_path):
    clip_dir, lm_dir = components
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=clip_dir, lm=lm_dir)
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert str(clip_dir) not in saved and str(lm_dir) not in saved
    assert json.loads(saved)["clip_config"].get("_name_or_path", "") == ""


# ------------------------------------------------------------------------------------- config and processor
def test_causal_lm_types_are_those_auto_model_for_causal_lm_knows():
    assert compat.is_causal_lm_type("gpt2") and compat.is_causal_lm_type("opt")
    assert not compat.is_causal_lm_type("clip") and not compat.is_causal_lm_type("t5")


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_an_image_processor_rebuilds_on_the_other_backend_with_its_settings(backend):
    """transformers 5 names the PIL class of an image processor X `XPil` (CLIPImageProcessor / CLIPImageProcessorPil)."""
    other = {"pil": "torchvision", "torchvision": "pil"}[backend]
    source = compat.image_processor_with_backend(
        transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}), other)
    assert source.backend == other
    rebuilt = compat.image_processor_with_backend(source, backend)
    assert rebuilt.backend == backend
    assert type(rebuilt).__name__ == ("CLIPImageProcessorPil" if backend == "pil" else "CLIPImageProcessor")
    drop = ("image_processor_type", "backend")
    assert {k: v for k, v in rebuilt.to_dict().items() if k not in drop} == \
        {k: v for k, v in source.to_dict().items() if k not in drop}
    assert compat.image_processor_with_backend(rebuilt, backend) is rebuilt


def test_pil_is_pillow():
    assert compat.PIL.Image.new("RGB", (2, 2)).size == (2, 2) and hasattr(compat.PIL.ImageOps, "exif_transpose")


# ---------------------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("flag", compat.PIPELINE_LOADER_FLAGS)
def test_pipeline_reads_the_loader_flags(flag):
    assert hasattr(Pipeline, flag)
    assert flag in inspect.getsource(transformers.pipelines.pipeline)


@pytest.mark.parametrize("flag", compat.PIPELINE_GENERATION_FLAGS)
def test_the_pipeline_base_reads_the_generation_flags(flag):
    assert hasattr(Pipeline, flag) and flag in inspect.getsource(Pipeline.__init__)


def test_pipeline_generate_kwargs_put_the_call_over_the_construction_options(checkpoint):
    pipe = transformers.pipeline("image-to-text", model=str(checkpoint), trust_remote_code=True, num_beams=2)
    assert hasattr(pipe, "_prepare_generate_kwargs"), "transformers' Pipeline no longer has _prepare_generate_kwargs"
    merged = compat.pipeline_generate_kwargs(pipe, {"max_new_tokens": 3})
    assert merged["num_beams"] == 2 and merged["max_new_tokens"] == 3
    assert compat.pipeline_generate_kwargs(pipe, {"num_beams": 5})["num_beams"] == 5


# ------------------------------------------------------------------------------------- no silent slow path
def test_without_a_shareable_cache_generate_warns_once_and_decodes_the_same(model, processor, monkeypatch, caplog):
    pixel_values = processor(images=[random_image(5)])["pixel_values"]
    expected = model.generate(pixel_values=pixel_values, output_candidates=True)
    monkeypatch.setattr(modeling, "cache_argument", lambda module: None)  # an LM forward that takes no cache
    modeling.logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        slow = model.generate(pixel_values=pixel_values, output_candidates=True)
        model.generate(pixel_values=pixel_values)
    warnings = [r.getMessage() for r in caplog.records if "prefix cache cannot be shared" in r.getMessage()]
    assert len(warnings) == 1 and "a cache argument (cache or past_key_values)" in warnings[0]
    assert torch.equal(slow.candidates, expected.candidates)


def test_the_shared_prefill_is_on_with_this_transformers(model, processor, caplog):
    """No warning on the installed transformers: beam search shares the prefix cache (the fast path)."""
    modeling.logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        model.generate(**processor(images=[random_image(6)]))
    assert not [r for r in caplog.records if "prefix cache cannot be shared" in r.getMessage()]

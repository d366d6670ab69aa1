"""The transformers details MacCap relies on beyond its stable public API, each in one small named place.

Remote code runs on whatever transformers a Hub user has, so everything here is keyed off what the installed
version offers, never off a version number, and each assumption has its own test
(tests/test_transformers_compat.py): the next upgrade that moves one fails there, loudly, not silently in
`generate`. Imported first by every remote-code file, so an older transformers stops at the version check
(the one check that is keyed off the version number).

What lives here: the KV-cache argument of a model's forward (`cache` since 5.24, `past_key_values` before); a
model's attention implementation (`config._attn_implementation`, `_can_set_attn_implementation`);
`GenerationMixin._prepare_generation_config` (private: the generation config as `generate` completes it); the id
`generate` pads finished rows with; CLIP's module layout (`encoder.layers[-1].layer_norm1`, `self_attn.q_proj /
k_proj / num_heads / head_dim / scale`); the `Pipeline` class flags and `_prepare_generate_kwargs` (private);
`configuration_utils.SubConfigSpec / strict`, `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, `image_utils.PIL` (internal
module paths); the `XPil` naming of PIL image processors. Replaced by public APIs elsewhere: `CLIPModel._from_config`
(now `AutoModel.from_config`), `config._name_or_path` (now `name_or_path`).
"""

import contextlib
import inspect
import re

import transformers

# The oldest transformers the package is tested on (the committed lock); setup.py admits the same.
MIN_TRANSFORMERS = "5.23.0"


def _release(version):
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def check_transformers_version(version=None):
    """Raise one ImportError naming the version needed when transformers is older than MIN_TRANSFORMERS."""
    version = transformers.__version__ if version is None else version
    if _release(version) < _release(MIN_TRANSFORMERS):
        raise ImportError(f"MacCap needs transformers>={MIN_TRANSFORMERS}, but transformers {version} is installed: "
                          f"pip install -U 'transformers>={MIN_TRANSFORMERS}'")


check_transformers_version()

# Only now: these names do not all exist in older releases.
from transformers.configuration_utils import SubConfigSpec, strict  # noqa: E402, F401  (config sub-specs, validation)
from transformers.image_utils import PIL  # noqa: E402, F401  (Pillow, as transformers' own image code imports it)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402


def is_causal_lm_type(model_type):
    """Whether `AutoModelForCausalLM` knows this model type (built in; remote-code LMs are not listed)."""
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# ------------------------------------------------------------------------------------------------ generation
# The names under which a model's forward has taken its KV cache: `cache` since 5.24, `past_key_values` before.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model):
    """The name under which `model.forward` takes (and its output returns) the KV cache, or None if it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in params), None)


def accepts_argument(model, name):
    return name in inspect.signature(model.forward).parameters


def completed_generation_config(lm, generation_config):
    """`generation_config` completed with the LM's and the library's defaults, as `lm.generate` completes it (the
    beams, returned sequences and cache settings it will really use). None where that step is not available."""
    prepare = getattr(lm, "_prepare_generation_config", None)
    if prepare is None:
        return None
    return prepare(generation_config)[0]


@contextlib.contextmanager
def attention_implementation(model, name, replacing):
    """Run `model` with the attention implementation `name` inside the block where it has `replacing`, and with its
    own again after, through the public `set_attn_implementation`. What it has is read from
    `config._attn_implementation`, and whether it can switch from `_can_set_attn_implementation` (both private).
    Yields whether the block runs with `name`; a model that has another or cannot switch runs as it is."""
    current = getattr(model.config, "_attn_implementation", None)
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if current != replacing or not hasattr(model, "set_attn_implementation") or not (can_set and can_set()):
        yield current == name
        return
    model.set_attn_implementation(name)
    try:
        yield model.config._attn_implementation == name
    finally:
        model.set_attn_implementation(current)


def generate_pad_id(config):
    """The id transformers' generate fills finished rows with: the pad id (EOS without one); beam search takes EOS
    for a pad id of 0, and -1 without EOS."""
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = eos if config.pad_token_id is None else config.pad_token_id
    if config.num_beams > 1:
        return -1 if eos is None else (pad or eos)
    return -1 if pad is None else pad


# ------------------------------------------------------------------------------------------------------- CLIP
def clip_last_layer_attention(vision_model, pixel_values):
    """(last_hidden_state, A) of a CLIP vision tower: A is the last layer's attention probabilities averaged over
    heads, (batch, tokens, tokens), float32. The last layer's attention input (after `layer_norm1`) is caught with
    a hook and the probabilities recomputed from its q/k projections, so the tower keeps SDPA/flash attention."""
    last_layer = vision_model.encoder.layers[-1]
    captured = {}
    hook = last_layer.layer_norm1.register_forward_hook(lambda mod, inp, out: captured.update(h=out))
    try:
        hidden = vision_model(pixel_values=pixel_values).last_hidden_state
    finally:
        hook.remove()
    attn, h = last_layer.self_attn, captured["h"]
    batch, tokens, _ = h.shape
    q = attn.q_proj(h).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    k = attn.k_proj(h).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    return hidden, ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)


# ------------------------------------------------------------------------------------------ image processors
def image_processor_with_backend(image_processor, backend):
    """The same image processor on `backend` ("pil" or "torchvision"), built from its settings. transformers 5
    names the PIL class of an image processor X `XPil`; a saved processor records X alone, so a reload picks the
    torchvision backend when torchvision is installed (its resizing differs slightly from PIL's)."""
    if getattr(image_processor, "backend", backend) == backend:
        return image_processor
    name = type(image_processor).__name__
    base = name[: -len("Pil")] if name.endswith("Pil") else name
    cls = getattr(transformers, base + "Pil" if backend == "pil" else base)
    return cls.from_dict(image_processor.to_dict())


# -------------------------------------------------------------------------------------------------- pipelines
# Class flags `pipeline()` reads to decide what to load beside the model (MacCap's pipeline wants the processor).
PIPELINE_LOADER_FLAGS = ("_load_processor", "_load_image_processor", "_load_feature_extractor", "_load_tokenizer")
# Class attributes the Pipeline base reads for generating pipelines.
PIPELINE_GENERATION_FLAGS = ("_pipeline_calls_generate", "_default_generation_config")


def pipeline_generate_kwargs(pipe, generate_kwargs):
    """The call's generation options on top of those given when the pipeline was built (`pipeline(..., num_beams=2)`)."""
    prepare = getattr(pipe, "_prepare_generate_kwargs", None)
    if prepare is not None:
        return prepare(generate_kwargs)
    return {**getattr(pipe, "_generate_kwargs", {}), **generate_kwargs}


__all__ = ["CACHE_ARGUMENTS", "MIN_TRANSFORMERS", "PIL", "PIPELINE_GENERATION_FLAGS", "PIPELINE_LOADER_FLAGS",
           "SubConfigSpec", "accepts_argument", "cache_argument", "check_transformers_version",
           "clip_last_layer_attention", "completed_generation_config", "generate_pad_id", "image_processor_with_backend",
           "is_causal_lm_type",
           "pipeline_generate_kwargs", "strict"]

"""`OnnxMacCapCaptioner`: MacCap's `generate()` on the ONNX graphs `maccap export-onnx` writes, run by ONNX Runtime.

    captioner = OnnxMacCapCaptioner.from_folder("maccap-onnx")
    inputs = captioner.processor(images=[image1, image2])
    captions = captioner.processor.batch_decode(captioner.generate(**inputs))

The control flow is the PyTorch model's own: `generate`, `noisy_prefixes`, `decode_prefixes`, `rerank`, `answer` and
their helpers are MacCapForConditionalGeneration's functions, taken as they are, so the noise (the same
`sample_noise` / `image_seed` / `noise_injection`, per-image generators), the number of candidates, the decoding
and the CLIP reranking are the same code. What touches weights is swapped for ONNX Runtime sessions: the vision
tower and subregion features, the projector, the CLIP text tower, and the LM, which is a transformers
`GenerationMixin` model whose forward runs the prefill / decode graphs on a `DynamicCache`, so that beam search (and
every other decoding mode) is transformers' own `generate` with the same generation config. In float32 the
captions equal the PyTorch model's (tests/test_onnx.py); a random LM's near-ties could in principle break
differently at the graphs' ~1e-6 rounding differences.

Tensors cross into ONNX Runtime as NumPy arrays on the CPU (the default provider is CPUExecutionProvider).
"""

import inspect
import json
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..configuration_maccap import MacCapConfig
from ..modeling_maccap import (
    MacCapForConditionalGeneration,
    MacCapSubregionOutput,
    noise_injection,
    sample_noise,
)
from ..processing_maccap import MacCapProcessor
from ..transformers_compat import CACHE_ARGUMENTS
from .errors import MacCapError, listing
from .onnx_export import FORMAT, GRAPHS, LM_GENERATION_DIR, MANIFEST, cache_names

# The files every export has beside the graphs (the manifest names the graphs' files).
REQUIRED_FILES = (MANIFEST, "config.json", "generation_config.json", "processor_config.json",
                  f"{LM_GENERATION_DIR}/generation_config.json")


def generation_cache_argument():
    """The name under which transformers' `generate` hands a model its KV cache (`cache` since 5.24,
    `past_key_values` before): the LM wrapper's forward takes it under that name only."""
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return next(name for name in CACHE_ARGUMENTS if name in params)


def check_export_folder(folder):
    """The manifest of the ONNX export in `folder`; a folder that is not one (or not a whole one) is one MacCapError
    naming everything missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MacCapError(f"{folder}: no such folder (an ONNX export is a folder written by `maccap export-onnx`)")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    manifest = None
    if MANIFEST not in missing:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise MacCapError(f"{folder / MANIFEST}: not a readable manifest ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise MacCapError(f"{folder / MANIFEST}: not a MacCap ONNX manifest (format {FORMAT!r} expected)")
        missing += [f for f in manifest.get("files", []) if not (folder / f).is_file() and f not in missing]
        missing += [f"the {name} graph in the manifest" for name in GRAPHS if name not in manifest.get("graphs", {})]
    if missing:
        raise MacCapError(f"{folder} is not a MacCap ONNX export (`maccap export-onnx MODEL {folder}` writes one): "
                          f"missing {listing(missing)}")
    return manifest


class OnnxGraph:
    """One ONNX Runtime session called with torch tensors by input name; returns its outputs as torch tensors."""

    def __init__(self, path, inputs, outputs, session_options=None, providers=None):
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.session = onnxruntime.InferenceSession(str(path), sess_options=session_options,
                                                    providers=providers or ["CPUExecutionProvider"])

    def __call__(self, **feeds):
        arrays = {name: np.ascontiguousarray(feeds[name].detach().cpu().numpy()) for name in self.inputs}
        return [torch.from_numpy(out) for out in self.session.run(self.outputs, arrays)]


class OnnxEmbedding(nn.Module):
    """The LM's token embeddings (the lm_embed graph), called like an `nn.Embedding` on ids."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    @property
    def weight(self):
        # decode_prefixes reads the embedding weight's device and dtype only: the graph's, CPU float32.
        return torch.empty(0)

    def forward(self, input_ids):
        return self.graph(input_ids=input_ids.to(torch.int64))[0]


class OnnxCausalLM(PreTrainedModel, GenerationMixin):
    """The LM as transformers' `generate` sees a causal LM: its forward runs lm_prefill (empty cache) or lm_decode
    (the cache's past) and appends the new positions to the `DynamicCache` it is given (or a new one). Its logits are
    the last position's only, which is all decoding reads. It is its own base model (MacCap's `_decode` runs the
    shared prefill through `base_model`)."""

    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config, graphs, num_layers, generation_config):
        super().__init__(config)
        self.embed = OnnxEmbedding(graphs["lm_embed"])
        self.prefill_graph, self.decode_graph = graphs["lm_prefill"], graphs["lm_decode"]
        self.num_layers = num_layers
        self.generation_config = generation_config

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                logits_to_keep=None, **kwargs):
        cache = kwargs.pop(CACHE_ARGUMENT, None)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        past = 0 if cache is None else cache.get_seq_length()
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.int64)
        if position_ids is None:  # as generate derives them from the mask
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -length:]
        feeds = {"inputs_embeds": inputs_embeds.float(), "attention_mask": attention_mask.to(torch.int64),
                 "position_ids": position_ids.to(torch.int64)}
        if past:
            for i, layer in enumerate(cache.layers):
                feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = layer.keys, layer.values
        logits, *present = (self.decode_graph if past else self.prefill_graph)(**feeds)
        if cache is None:
            cache = DynamicCache(config=self.config)
        for i in range(self.num_layers):
            cache.update(present[2 * i][:, :, past:], present[2 * i + 1][:, :, past:], i)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_ARGUMENT: cache})


CACHE_ARGUMENT = generation_cache_argument()
# The forward's signature names the cache argument as this transformers' generate passes it (and as MacCap's
# `_decode` finds it with `cache_argument`).
_params = list(inspect.signature(OnnxCausalLM.forward).parameters.values())
OnnxCausalLM.forward.__signature__ = inspect.Signature(
    _params[:-1] + [inspect.Parameter(CACHE_ARGUMENT, inspect.Parameter.KEYWORD_ONLY, default=None), _params[-1]])

_TORCH = MacCapForConditionalGeneration


class OnnxMacCapCaptioner:
    """MacCap captioning on ONNX Runtime: `generate` and `answer` as MacCapForConditionalGeneration has them (the same
    functions), on the graphs of an export folder. Build it with `from_folder`."""

    # The PyTorch model's control flow, unchanged.
    generate = _TORCH.generate
    answer = _TORCH.answer
    noisy_prefixes = _TORCH.noisy_prefixes
    decode_prefixes = _TORCH.decode_prefixes
    rerank = _TORCH.rerank
    embed_texts = _TORCH.embed_texts
    score_captions = _TORCH.score_captions
    format_vqa_prompts = _TORCH.format_vqa_prompts
    _prompts = _TORCH._prompts
    _decode = _TORCH._decode
    _shared_prefill_cache_name = _TORCH._shared_prefill_cache_name
    _image_generators = _TORCH._image_generators
    _check_pixel_values = _TORCH._check_pixel_values

    def __init__(self, config, generation_config, processor, graphs, language_model, manifest=None):
        self.config, self.generation_config, self.processor = config, generation_config, processor
        self.graphs, self.language_model, self.manifest = graphs, language_model, manifest

    @classmethod
    def from_folder(cls, folder, providers=None, session_options=None):
        """Load an export folder. `providers` / `session_options`: ONNX Runtime's (default: CPUExecutionProvider)."""
        folder = Path(folder)
        manifest = check_export_folder(folder)
        config = MacCapConfig.from_pretrained(folder)
        generation_config = GenerationConfig.from_pretrained(folder)
        # As MacCapForConditionalGeneration.from_pretrained attaches it: built-in tokenizers and image processor.
        processor = MacCapProcessor.from_pretrained(folder, trust_remote_code=False)
        graphs = {name: OnnxGraph(folder / spec["file"], spec["inputs"], spec["outputs"], session_options, providers)
                  for name, spec in manifest["graphs"].items() if name in GRAPHS}
        layers = manifest["lm_layers"]
        expected = cache_names(layers, "past")
        if graphs["lm_decode"].inputs[3:] != expected:
            raise MacCapError(f"{folder / MANIFEST}: lm_decode's cache inputs are not {listing(expected)}")
        lm = OnnxCausalLM(config.text_config, graphs, layers,
                          GenerationConfig.from_pretrained(folder / LM_GENERATION_DIR))
        return cls(config, generation_config, processor, graphs, lm, manifest)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_subregion_features(self, pixel_values):
        """The vision graph: g and the k subregion features (token_embeds and attentions are not exported)."""
        self._check_pixel_values(pixel_values)
        image_embeds, features = self.graphs["vision"](pixel_values=pixel_values.float())
        return MacCapSubregionOutput(subregion_features=features, image_embeds=image_embeds)

    def _prefix_from_features(self, features, variance, generators=None):
        noise = sample_noise(features.shape, variance, generators)
        return self.graphs["projector"](features=noise_injection(features, noise))[0]

    def get_text_embeds(self, clip_input_ids, clip_attention_mask=None):
        if clip_attention_mask is None:
            clip_attention_mask = torch.ones_like(clip_input_ids)
        return self.graphs["clip_text"](input_ids=clip_input_ids.to(torch.int64),
                                        attention_mask=clip_attention_mask.to(torch.int64))[0]

    def caption(self, images, **generate_kwargs):
        """Captions of images (anything the processor takes), one string each."""
        inputs = self.processor(images=images)
        return self.processor.batch_decode(self.generate(**inputs, **generate_kwargs))


__all__ = ["OnnxCausalLM", "OnnxMacCapCaptioner", "check_export_folder"]

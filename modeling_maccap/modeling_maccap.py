"""MacCap: CLIP -> projector (learned queries, aligner, MLP) -> causal LM, trained on captions alone.

Training embeds a caption with CLIP's text tower, injects Gaussian noise (the modality gap), and teaches the
projector to turn k noisy copies into a prefix from which the frozen LM reconstructs the caption. Inference
replaces the text embedding by k image subregion features, draws several noisy candidates per image, decodes
them in batched LM calls and keeps the one CLIP finds closest to the image (reranking).
"""

from .transformers_compat import (  # first: it checks the transformers version
    CACHE_ARGUMENTS,
    accepts_argument,
    attention_implementation,
    cache_argument,
    clip_last_layer_attention,
    completed_generation_config,
    generate_pad_id,
)

import contextlib  # noqa: I001
import copy
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, CLIPModel, GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.utils import ModelOutput, has_file, logging

from .configuration_maccap import MacCapConfig
from .pipeline_maccap import MacCapImageToTextPipeline
from .processing_maccap import MacCapProcessor, clip_source

logger = logging.get_logger(__name__)

# Zero-shot VQA decoding, as the reference (BLIP-2's setting): 5 beams, 1 to 10 new tokens, and a negative length
# penalty, which favours short answers.
VQA_GENERATE_DEFAULTS = {"num_beams": 5, "min_new_tokens": 1, "max_new_tokens": 10, "length_penalty": -1.0}

PROCESSOR_FILE = "processor_config.json"  # written by MacCapProcessor.save_pretrained
# generate(max_decode_rows=None) on CPU: LM rows (x beams) per LM call; measured fastest with GPT-2 124M.
CPU_DECODE_ROWS = 128
# The LM's attention while decoding on CPU with bfloat16 or float16 weights, in place of SDPA: at one new token per
# row, SDPA's CPU kernel is the slower there (batch 32, 4 candidates, GPT-2 124M: 26.4 s against 20.1 s eager).
CPU_HALF_DECODE_ATTENTION = "eager"
# The decoding modes in which every input row is expanded (beams, returned sequences) before the first forward,
# so that the [prefix | prompt] can be run once per row and its cache shared.
_EXPANDED_MODES = (GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)


@dataclass
class MacCapCausalLMOutput(ModelOutput):
    """
    loss: cross-entropy over caption tokens (prefix, BOS and padding excluded), when `labels` are given.
    logits: (batch, text_len, vocab): logits[:, t] predicts text token t + 1, as in any causal LM.
    prefix_embeds: (batch, num_queries, lm_hidden): the projector's output fed to the LM before the text.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    prefix_embeds: torch.FloatTensor | None = None


@dataclass
class MacCapSubregionOutput(ModelOutput):
    """
    subregion_features: (batch, k, joint_dim): f_i = g + patch_weight * m_i, not re-normalised.
    image_embeds: (batch, joint_dim): g, the L2-normalised projected CLS token.
    token_embeds: (batch, tokens, joint_dim): P, every final token after post-layernorm and projection, normalised.
    attentions: (batch, tokens, tokens): A, the last layer's attention probabilities averaged over heads.
    """

    subregion_features: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    token_embeds: torch.FloatTensor | None = None
    attentions: torch.FloatTensor | None = None


@dataclass
class MacCapGenerateOutput(ModelOutput):
    """
    sequences: (batch, prompt_len + new): the kept caption per image, prompt ids first (decoder-only convention).
    candidates: (batch, num_candidates, prompt_len + new): every decoded candidate.
    candidate_scores: (batch, num_candidates): CLIP cosine of each candidate with its image (None without reranking).
    """

    sequences: torch.LongTensor | None = None
    candidates: torch.LongTensor | None = None
    candidate_scores: torch.FloatTensor | None = None


def sample_noise(shape, variance, generators=None, device=None):
    """Zero-mean Gaussian noise of the given variance (float32). With `generators`, one per leading row, each row
    is drawn on the CPU from its own generator, so a row's noise does not depend on the rest of the batch."""
    std = variance**0.5
    if generators is None:
        return torch.randn(shape, device=device) * std
    rows = [torch.randn(shape[1:], generator=g) for g in generators]
    return (torch.stack(rows) * std).to(device)


def noise_injection(features, noise):
    """The paper's noise injection: add the noise, then project back onto the unit sphere."""
    return F.normalize(features.float() + noise, dim=-1)


def image_seed(pixel_values, noise_seed):
    """A seed derived from one image's pixels and a base seed: equal images get equal noise in any batch."""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()  # no-op if already so
    digest = hashlib.blake2b(data, digest_size=8, key=str(noise_seed).encode()).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MacCapAlignerLayer(nn.Module):
    """One DETR-style decoder layer, post-norm: query self-attention, cross-attention to the k features, FFN."""

    def __init__(self, dim, heads, ffn_dim, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, features, key_padding_mask=None):
        x = self.norm1(queries + self.dropout(self.self_attn(queries, queries, queries, need_weights=False)[0]))
        # No positional encoding on the keys: the k features are a set. key_padding_mask: True = not a key.
        x = self.norm2(x + self.dropout(self.cross_attn(x, features, features, key_padding_mask=key_padding_mask,
                                                        need_weights=False)[0]))
        return self.norm3(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class MacCapProjector(nn.Module):
    """Learned queries cross-attend to k noisy CLIP features (the aligner), then a 3-layer MLP maps each query
    to the LM's embedding width: (batch, k, joint_dim) -> (batch, num_queries, lm_hidden)."""

    def __init__(self, config):
        super().__init__()
        dim, lm_hidden = config.projector_dim, config.text_config.hidden_size
        self.queries = nn.Embedding(config.num_queries, dim)
        self.layers = nn.ModuleList(
            MacCapAlignerLayer(dim, config.aligner_heads, config.aligner_ffn_dim, config.aligner_dropout)
            for _ in range(config.aligner_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, lm_hidden)])

    def forward(self, features, key_padding_mask=None):
        x = self.queries.weight.unsqueeze(0).expand(features.shape[0], -1, -1)
        features = features.to(x.dtype)
        for layer in self.layers:
            x = layer(x, features, key_padding_mask)
        x = self.norm(x)
        for i, linear in enumerate(self.mlp):
            x = linear(x) if i == len(self.mlp) - 1 else F.relu(linear(x))
        return x


# ------------------------------------------------------------------ PCM-Net's salient concepts (off by default)
def salient_concepts(image_embeds, concept_embeds, count, temperature):
    """The image's top `count` concepts by softmax(cos(image, concept) / temperature) -> (probabilities, indices),
    each (batch, count)."""
    logits = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(concept_embeds.float(), dim=-1).T
    return (logits / temperature).softmax(-1).topk(count, dim=-1)


def patch_concept_features(patch_embeds, concepts, temperature):
    """Cosine of every patch with each of its image's concepts, sim (batch, patches, concepts), and the per-patch
    concept feature v_p = sum_c softmax_c(sim_pc / temperature) t_c (batch, patches, dim)."""
    concepts = F.normalize(concepts.float(), dim=-1)
    sim = F.normalize(patch_embeds.float(), dim=-1) @ concepts.transpose(1, 2)
    return sim, (sim / temperature).softmax(-1) @ concepts


def selected_patches(sim, pairs, temperature):
    """The patches of the top `pairs` (patch, concept) pairs of one softmax over all of an image's pairs
    (sim / temperature): a (batch, patches) bool mask; a patch in two pairs is selected once."""
    batch, patches, concepts = sim.shape
    top = (sim.flatten(1) / temperature).softmax(-1).topk(min(pairs, patches * concepts), dim=-1).indices
    mask = torch.zeros(batch, patches * concepts, dtype=torch.bool, device=sim.device).scatter(1, top, True)
    return mask.view(batch, patches, concepts).any(-1)


@dataclass
class MacCapConceptOutput(ModelOutput):
    """
    patch_embeds: (batch, patches, joint_dim): e_p, the projected, normalised patch tokens (P without the CLS).
    concept_ids: (batch, salient_concepts): the image's salient concepts (indices into config.concepts).
    concept_features: (batch, patches, joint_dim): v_p, each patch's mix of the salient concepts' embeddings.
    selected: (batch, patches): the patches of the top (patch, concept) pairs.
    """

    patch_embeds: torch.FloatTensor | None = None
    concept_ids: torch.LongTensor | None = None
    concept_features: torch.FloatTensor | None = None
    selected: torch.BoolTensor | None = None


def load_clip_model(clip, dtype=None):
    """A `CLIPModel` from a Hub id or folder, or from "open_clip:ARCH/TAG" (converted; needs maccap[open_clip])."""
    source = clip_source(clip)
    if source is not None:
        return source[0](clip, dtype=dtype)
    return CLIPModel.from_pretrained(clip, dtype=dtype)


class MacCapPreTrainedModel(PreTrainedModel):
    config: MacCapConfig
    config_class = MacCapConfig
    base_model_prefix = "maccap"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MacCapProjector"]
    _supports_sdpa = True


class MacCapForConditionalGeneration(MacCapPreTrainedModel, GenerationMixin):
    """MacCap captioner. `forward` is the text-only training objective (or image-conditioned teacher forcing);
    `generate` captions images with subregion aggregation, noise injection and CLIP reranking; `answer` answers
    questions about images (zero-shot VQA: the same prefix, then the VQA prompt, no reranking).

    The CLIP and LM tokenizers are needed to rerank (candidates are re-tokenised for CLIP): they come from an
    attached `MacCapProcessor` (`model.processor`, set by `from_pretrained_components` and by `from_pretrained`
    when the folder has processor files) or from `generate(..., processor=...)`.
    """

    def __init__(self, config, clip=None, language_model=None):
        super().__init__(config)
        self.clip = clip if clip is not None else AutoModel.from_config(config.clip_config)
        self.projector = MacCapProjector(config)
        if config.concepts is not None:  # PCM-Net: the vocabulary's CLIP text embeddings and their projection
            self.register_buffer("concept_embeds", torch.zeros(len(config.concepts), config.projector_dim))
            self.concept_projection = nn.Linear(config.projector_dim, config.projector_dim)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        self.processor = None
        self.post_init()
        # The reference decoding: beam search with 4 beams, 16 new tokens (generation_config.json overrides).
        gc = self.generation_config
        gc.num_beams, gc.max_new_tokens = 4, 16
        if gc.pad_token_id is None:
            gc.pad_token_id = gc.eos_token_id

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_components(cls, clip_model, language_model, **config_kwargs):
        """Assemble a MacCap around a built `CLIPModel` and causal LM; `config_kwargs` set `MacCapConfig` fields."""
        for sub in (clip_model.config, clip_model.config.text_config, clip_model.config.vision_config,
                    language_model.config):
            sub.name_or_path = ""  # don't leak local paths of the components into config.json
        config = MacCapConfig(clip_config=clip_model.config, text_config=language_model.config, **config_kwargs)
        return cls(config, clip=clip_model, language_model=language_model)

    @classmethod
    def from_pretrained_components(cls, clip, lm, freeze_clip=True, freeze_lm=True, dtype=None, **config_kwargs):
        """Assemble an untrained MacCap from a CLIP checkpoint and a causal-LM checkpoint (hub ids or folders).
        `clip` may also be "open_clip:ARCH/TAG" (e.g. "open_clip:ViT-B-32/openai"; no TAG: open_clip's random
        init), converted into the HF CLIP tower. `config_kwargs` set any `MacCapConfig` field. CLIP and the LM are
        frozen unless told otherwise."""
        model = cls.from_components(load_clip_model(clip, dtype=dtype),
                                    AutoModelForCausalLM.from_pretrained(lm, dtype=dtype), **config_kwargs)
        if dtype is not None:
            model.projector.to(dtype)
        model.clip.requires_grad_(not freeze_clip)
        model.language_model.requires_grad_(not freeze_lm)
        model.processor = MacCapProcessor.from_pretrained_components(clip=clip, lm=lm)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then attach the processor saved beside the weights, if there is one
        (a broken one raises)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        subfolder = kwargs.get("subfolder") or ""
        model.processor = None
        if has_file(pretrained_model_name_or_path, os.path.join(subfolder, PROCESSOR_FILE), **hub_kwargs):
            # trust_remote_code=False: the processor itself is this class; its tokenizers and image processor must
            # be built-in classes, and no code from the folder runs without the user asking for it.
            model.processor = MacCapProcessor.from_pretrained(pretrained_model_name_or_path, trust_remote_code=False,
                                                              subfolder=subfolder, **hub_kwargs)
        elif model.config.rerank:
            logger.warning(f"No MacCap processor files in {pretrained_model_name_or_path}: reranking needs "
                           "generate(..., processor=MacCapProcessor...) or rerank=False")
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Extra auto classes and the pipeline entry make the saved folder usable as remote code
        # (AutoModelForImageTextToText, pipeline("image-to-text", trust_remote_code=True)).
        module = type(self).__module__.split(".")[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModelForImageTextToText"] = f"{module}.{type(self).__name__}"
        self.config.auto_map = auto_map
        pipe_module = MacCapImageToTextPipeline.__module__.split(".")[-1]
        self.config.custom_pipelines = {
            "image-to-text": {
                "impl": f"{pipe_module}.{MacCapImageToTextPipeline.__name__}",
                "pt": ["AutoModelForImageTextToText"],
                "type": "multimodal",
            }
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    # --------------------------------------------------------------------------------------- image features
    def get_subregion_features(self, pixel_values):
        """Subregion aggregation (method.md, as the reference computes it): the k tokens the CLS attends to most,
        each replaced by a softmax-weighted mix of all projected tokens, added to the global embedding."""
        config, vision = self.config, self.clip.vision_model
        self._check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(vision.embeddings.patch_embedding.weight.device,
                                       vision.embeddings.patch_embedding.weight.dtype)
        # A: the last layer's attention, recomputed from its q and k so the tower keeps SDPA (not eager everywhere).
        hidden, attentions = clip_last_layer_attention(vision, pixel_values)
        tokens = attentions.shape[-1]

        token_embeds = F.normalize(self.clip.visual_projection(vision.post_layernorm(hidden)).float(), dim=-1)
        image_embeds = token_embeds[:, 0]  # g: the projected CLS is token 0 of P
        num_subregions = config.num_subregions
        if config.subregion_mode == "cls":
            features = image_embeds.unsqueeze(1).expand(-1, num_subregions, -1)
        else:
            if num_subregions > tokens:
                raise ValueError(f"num_subregions={num_subregions} exceeds the {tokens} vision tokens of this CLIP")
            chosen = attentions[:, 0].topk(num_subregions, dim=-1).indices  # may include the CLS itself
            rows = attentions.gather(1, chosen.unsqueeze(-1).expand(-1, -1, tokens))
            # A softmax over probabilities (the reference's choice): each mix is close to a uniform average.
            weights = (rows / config.subregion_temperature).softmax(-1)
            mixed = F.normalize(weights @ token_embeds, dim=-1)
            features = image_embeds.unsqueeze(1) + config.patch_weight * mixed
        return MacCapSubregionOutput(subregion_features=features, image_embeds=image_embeds,
                                     token_embeds=token_embeds, attentions=attentions)

    def get_text_embeds(self, clip_input_ids, clip_attention_mask=None):
        """L2-normalised CLIP text embeddings (projected EOT feature), float32."""
        device = self.clip.text_projection.weight.device
        if clip_attention_mask is not None:
            clip_attention_mask = clip_attention_mask.to(device)
        out = self.clip.get_text_features(input_ids=clip_input_ids.to(device), attention_mask=clip_attention_mask)
        return F.normalize(out.pooler_output.float(), dim=-1)

    def _check_pixel_values(self, pixel_values):
        size = self.config.clip_config.vision_config.image_size
        expected = (3, size, size)
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            got = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), got {got}")

    def _image_generators(self, pixel_values, noise_seed):
        if noise_seed is None:
            return None
        pixel_values = pixel_values.detach().to("cpu", torch.float32)  # one transfer for the batch, not one per image
        return [torch.Generator().manual_seed(image_seed(p, noise_seed)) for p in pixel_values]

    def _prefix_from_features(self, features, variance, generators=None, extra_keys=None):
        noise = sample_noise(features.shape, variance, generators, device=features.device)
        keys, mask = noise_injection(features, noise), None
        if extra_keys is not None:  # PCM-Net's keys after the k noisy features (no noise on them)
            keys, mask = self._with_extra_keys(keys, *extra_keys)
        device = self.projector.queries.weight.device
        return self.projector(keys.to(device), None if mask is None else mask.to(device))

    # ----------------------------------------------------------------------- PCM-Net (config.patch_keys)
    def get_concept_features(self, subregions):
        """PCM-Net's salient concepts of each image (`subregions`: get_subregion_features' output): the top
        config.salient_concepts by softmax(cos(g, t_c) / T), each patch's concept feature v_p and the patches of
        the top config.concept_pairs (patch, concept) pairs."""
        config = self.config
        patch_embeds = subregions.token_embeds[:, 1:]
        _, concept_ids = salient_concepts(subregions.image_embeds, self.concept_embeds, config.salient_concepts,
                                          config.concept_temperature)
        sim, features = patch_concept_features(patch_embeds, self.concept_embeds[concept_ids],
                                               config.concept_temperature)
        return MacCapConceptOutput(patch_embeds=patch_embeds, concept_ids=concept_ids, concept_features=features,
                                   selected=selected_patches(sim, config.concept_pairs, config.concept_temperature))

    def extra_aligner_keys(self, subregions):
        """The keys after the k features at inference (config.patch_keys): the patch tokens e_p, then, with
        concepts and config.concept_tokens, the concept token Linear(v_p) of every patch, of which only the selected
        ones are keys. -> (keys, key_padding_mask: True = not a key, or None)."""
        patch_embeds = subregions.token_embeds[:, 1:]
        if self.config.concepts is None or not self.config.concept_tokens:
            return patch_embeds, None
        concepts = self.get_concept_features(subregions)
        tokens = self.concept_projection(concepts.concept_features.to(self.concept_projection.weight.dtype))
        keys = torch.cat([patch_embeds, tokens.float()], dim=1)
        return keys, torch.cat([torch.zeros_like(concepts.selected), ~concepts.selected], dim=1)

    @staticmethod
    def _with_extra_keys(keys, extra, extra_mask=None):
        keys = torch.cat([keys, extra.to(keys.device, keys.dtype)], dim=1)
        if extra_mask is None:
            return keys, None
        mask = torch.zeros(keys.shape[0], keys.shape[1] - extra.shape[1], dtype=torch.bool, device=keys.device)
        return keys, torch.cat([mask, extra_mask.to(keys.device)], dim=1)

    # ----------------------------------------------------------------------------------------------- training
    def forward(self, input_ids=None, attention_mask=None, labels=None, clip_input_ids=None,
                clip_attention_mask=None, clip_text_embeds=None, pixel_values=None, noise_seed=0):
        """Text-only training objective. The condition is one of: `clip_input_ids` (CLIP text tower, no grad),
        `clip_text_embeds` (precomputed CLIP text embeddings, e.g. a cache), or `pixel_values` (subregion features
        with inference noise seeded per image by `noise_seed`: image-conditioned teacher forcing for evaluation).
        `input_ids` are the LM tokens [BOS, caption, EOS]; `labels` mark with -100 what is not scored."""
        if input_ids is None:
            raise ValueError("forward needs input_ids: the LM tokens of the captions (BOS first)")
        if pixel_values is not None:
            subregions = self.get_subregion_features(pixel_values)
            extra = {"extra_keys": self.extra_aligner_keys(subregions)} if self.config.patch_keys else {}
            prefix = self._prefix_from_features(subregions.subregion_features, self.config.inference_noise_variance,
                                                self._image_generators(pixel_values, noise_seed), **extra)
        else:
            if clip_text_embeds is None:
                if clip_input_ids is None:
                    raise ValueError("forward needs one of clip_input_ids, clip_text_embeds or pixel_values")
                with torch.no_grad():
                    clip_text_embeds = self.get_text_embeds(clip_input_ids, clip_attention_mask)
            text = F.normalize(clip_text_embeds.float(), dim=-1)
            # Noise is fresh at every step (global RNG): k independent noisy copies of each caption embedding.
            copies = text.unsqueeze(1).expand(-1, self.config.num_subregions, -1)
            prefix = self._prefix_from_features(copies, self.config.train_noise_variance)

        embed = self.get_input_embeddings()
        input_ids = input_ids.to(embed.weight.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(input_ids.device)
        prefix = prefix.to(embed.weight.device, embed.weight.dtype)
        inputs_embeds = torch.cat([prefix, embed(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        text_len = input_ids.shape[1]
        # Only the text positions' logits (an LM without logits_to_keep computes them all, and they are cut).
        keep = {"logits_to_keep": text_len} if accepts_argument(self.language_model, "logits_to_keep") else {}
        logits = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, **keep).logits[:, -text_len:]

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return MacCapCausalLMOutput(loss=loss, logits=logits, prefix_embeds=prefix)

    # --------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, *, rerank=None,
                 num_candidates=None, output_candidates=False, noise_seed=0, processor=None, max_decode_rows=None,
                 **generate_kwargs):
        """Caption images as the paper does: subregion features of each image, `num_candidates` noisy prefixes per
        image, every candidate decoded by the LM, and CLIP reranking keeps the one closest to the image
        (config.rerank; with `rerank=False`, one draw and plain decoding).

        `input_ids` / `attention_mask`: an optional prompt after the prefix (BOS first, left-padded); default BOS.
        `noise_seed`: each image's noise comes from a generator seeded by it and the image's pixels, so an image gets
        the same caption in any batch (None: torch's global RNG). `processor`: the tokenizers reranking needs
        (default: `model.processor`). `max_decode_rows`: LM rows per LM `generate` call (see `_decode`). Other
        keyword arguments go to the LM's `generate` (num_beams, max_new_tokens, ...). Returns the kept sequences
        `[prompt | new]`, or a `MacCapGenerateOutput` with every candidate and its CLIP score when
        `output_candidates` or `return_dict_in_generate` is set."""
        return_dict = bool(generate_kwargs.pop("return_dict_in_generate", False)) or output_candidates
        rerank = self.config.rerank if rerank is None else rerank
        n = (num_candidates or self.config.num_candidates) if rerank else 1
        processor = processor or self.processor
        _check_generate_arguments(pixel_values, rerank, processor, max_decode_rows, generate_kwargs)

        subregions = self.get_subregion_features(pixel_values)  # one vision pass per image
        extra = {"extra_keys": self.extra_aligner_keys(subregions)} if self.config.patch_keys else {}
        prefix = self.noisy_prefixes(subregions.subregion_features, n, self._image_generators(pixel_values, noise_seed),
                                     **extra)
        prompt_ids, prompt_mask = self._prompts(input_ids, attention_mask, pixel_values.shape[0], n)
        sequences = self.decode_prefixes(prefix, prompt_ids, prompt_mask, max_decode_rows, **generate_kwargs)
        if not rerank:
            return MacCapGenerateOutput(sequences=sequences) if return_dict else sequences
        out = self.rerank(sequences, prompt_ids.shape[1], subregions.image_embeds, processor)
        return out if return_dict else out.sequences

    def noisy_prefixes(self, features, num_candidates, generators=None, extra_keys=None):
        """Noise injection at inference: each image's k features repeated per candidate, every copy with noise of its
        own (`config.inference_noise_variance`), through the projector -> (batch x candidates, queries, lm_hidden).
        `generators`: one per image (its candidates draw from it in turn), or None for the global RNG.
        `extra_keys`: (keys, key_padding_mask or None) per image, after the noisy features (config.patch_keys)."""
        features = features.repeat_interleave(num_candidates, dim=0)
        if generators is not None:
            generators = [g for g in generators for _ in range(num_candidates)]
        if extra_keys is None:
            return self._prefix_from_features(features, self.config.inference_noise_variance, generators)
        extra_keys = tuple(None if x is None else x.repeat_interleave(num_candidates, dim=0) for x in extra_keys)
        return self._prefix_from_features(features, self.config.inference_noise_variance, generators, extra_keys)

    def decode_prefixes(self, prefix, prompt_ids, prompt_mask, max_decode_rows=None, **generate_kwargs):
        """The LM's continuation of each [prefix | prompt] row -> `[prompt | new tokens]` (x num_return_sequences).
        The call's options go into a copy of generation_config (passing both is deprecated in transformers 5)."""
        embed = self.get_input_embeddings()
        prefix = prefix.to(embed.weight.device, embed.weight.dtype)
        inputs_embeds = torch.cat([prefix, embed(prompt_ids)], dim=1)
        mask = torch.cat([prompt_mask.new_ones(prefix.shape[:2]), prompt_mask], dim=1)
        gen_config = copy.deepcopy(self.generation_config)
        model_kwargs = gen_config.update(**generate_kwargs)
        new_tokens = self._decode(inputs_embeds, mask, gen_config, model_kwargs, max_decode_rows)
        repeats = new_tokens.shape[0] // prompt_ids.shape[0]  # num_return_sequences
        return torch.cat([prompt_ids.repeat_interleave(repeats, dim=0), new_tokens], dim=1)

    def rerank(self, sequences, prompt_length, image_embeds, processor=None):
        """CLIP reranking: each image's candidates (consecutive rows of `sequences`) are scored by the CLIP cosine of
        their text with the image embedding; the best is kept -> MacCapGenerateOutput."""
        batch = image_embeds.shape[0]
        n = sequences.shape[0] // batch
        captions = (processor or self.processor).batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
        scores = self.score_captions(captions, image_embeds.repeat_interleave(n, dim=0), processor).view(batch, n)
        candidates = sequences.view(batch, n, -1)
        best = candidates[torch.arange(batch, device=candidates.device), scores.argmax(-1).to(candidates.device)]
        return MacCapGenerateOutput(sequences=best, candidates=candidates, candidate_scores=scores)

    def _prompts(self, input_ids, attention_mask, batch, num_candidates):
        """The prompt after each candidate's prefix (BOS when none is given), repeated per candidate."""
        device = self.get_input_embeddings().weight.device
        if input_ids is None:
            input_ids, attention_mask = torch.full((batch, 1), self.generation_config.bos_token_id), None
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        return input_ids.repeat_interleave(num_candidates, dim=0), attention_mask.repeat_interleave(num_candidates, 0)

    def _decode(self, inputs_embeds, mask, gen_config, model_kwargs, max_rows):
        """The decoding engine: the new tokens of `language_model.generate` on these rows, as one call gives them.

        The rows go to the LM in calls of at most `max_rows` LM rows as the LM runs them (rows x beams, or x
        num_return_sequences; at least one row per call); shorter calls' new tokens are padded as generate pads.
        `max_rows=None`: 128 on CPU (the fastest there for GPT-2), no limit on other devices or when sampling (the
        random draws would follow the split); one call with the caller's own cache. With beam search or several
        returned sequences, each row's [prefix | prompt] is run once and its cache shared by its beams (not with
        the caller's cache, `use_cache=False`, a `cache_implementation` or an assistant model; where it is
        expected but this transformers or LM cannot do it, a one-time warning says why). On CPU with bfloat16 or
        float16 weights, an LM on SDPA attention decodes with `CPU_HALF_DECODE_ATTENTION` and gets SDPA back after."""
        lm = self.language_model
        completed = completed_generation_config(lm, gen_config)  # with the LM's defaults, as generate has them
        config = completed or gen_config
        expand = max(config.num_beams or 1, config.num_return_sequences or 1)  # LM rows per input row
        if max_rows is None and inputs_embeds.device.type == "cpu" and not config.do_sample:
            max_rows = CPU_DECODE_ROWS
        own_cache = bool(set(CACHE_ARGUMENTS) & model_kwargs.keys())
        if own_cache:
            max_rows = None  # the caller's cache serves one call
        cache_name = self._shared_prefill_cache_name(config, expand, model_kwargs, own_cache, completed is not None)

        def run(embeds, attn):
            kwargs = dict(model_kwargs)
            if cache_name is not None:
                # All but the last position, once per row, at the positions generate derives from the mask.
                positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
                out = lm.base_model(inputs_embeds=embeds[:, :-1], attention_mask=attn[:, :-1],
                                    position_ids=positions[:, :-1], use_cache=True)
                cache = getattr(out, cache_name)
                cache.batch_repeat_interleave(expand)
                kwargs[cache_name] = cache  # generate then runs only the last position
            return lm.generate(inputs_embeds=embeds, attention_mask=attn, generation_config=gen_config, **kwargs)

        rows = inputs_embeds.shape[0]
        step = rows if max_rows is None else max(1, max_rows // expand)
        half_on_cpu = inputs_embeds.device.type == "cpu" and lm.dtype in (torch.bfloat16, torch.float16)
        with (attention_implementation(lm, CPU_HALF_DECODE_ATTENTION, replacing="sdpa") if half_on_cpu
              else contextlib.nullcontext()):
            chunks = [run(inputs_embeds[i:i + step], mask[i:i + step]) for i in range(0, rows, step)]
        if len(chunks) == 1:
            return chunks[0]
        length = max(chunk.shape[1] for chunk in chunks)
        pad = generate_pad_id(config)
        return torch.cat([F.pad(chunk, (0, length - chunk.shape[1]), value=pad) for chunk in chunks])

    def _shared_prefill_cache_name(self, config, expand, model_kwargs, own_cache, completed):
        """The LM's cache argument when each row's [prefix | prompt] can be run once and its cache shared by the
        row's beams (or returned sequences); None when decoding does not expand rows or the caller's options rule
        it out. Where it is expected but the LM or transformers cannot do it, warn once (the slow path)."""
        if not (expand > 1 and config.get_generation_mode() in _EXPANDED_MODES and config.use_cache is not False
                and config.cache_implementation is None and getattr(config, "prefill_chunk_size", None) is None
                and not own_cache and not {"assistant_model", "custom_generate"} & model_kwargs.keys()):
            return None
        base = self.language_model.base_model
        name = cache_argument(base)
        missing = [what for what, ok in (
            ("the LM's completed generation config (GenerationMixin._prepare_generation_config)", completed),
            (f"a cache argument ({' or '.join(CACHE_ARGUMENTS)}) of {type(base).__name__}.forward", name is not None),
            (f"position_ids in {type(base).__name__}.forward", accepts_argument(base, "position_ids")),
        ) if not ok]
        if missing:
            logger.warning_once("MacCap generate: the prefix cache cannot be shared by the beams, so every beam runs "
                                f"the whole [prefix | prompt] (slower, same captions): missing {'; '.join(missing)}")
            return None
        return name

    def embed_texts(self, texts, processor=None):
        """L2-normalised CLIP text embeddings of strings, in one CLIP text call (tokenised by the processor's CLIP
        tokenizer, padded to the longest text): what training's feature cache, reranking and CLIPScore use."""
        tokens = (processor or self.processor).clip_text_inputs(texts)
        return self.get_text_embeds(tokens["input_ids"], tokens["attention_mask"])

    def score_captions(self, captions, image_embeds, processor=None):
        """CLIP cosine between each caption and its image embedding, on the first config.rerank_max_characters
        characters when that is set."""
        if self.config.rerank_max_characters is not None:
            captions = [caption[: self.config.rerank_max_characters] for caption in captions]
        text = self.embed_texts(captions, processor)
        return (text * image_embeds.to(text.device)).sum(-1)

    def format_vqa_prompts(self, questions):
        """The zero-shot VQA prompts (config.vqa_prompt) for a list of questions, to pass as the processor's text."""
        return [self.config.vqa_prompt.format(question=q.strip()) for q in questions]

    @torch.no_grad()
    def answer(self, pixel_values, questions, processor=None, **generate_kwargs):
        """Zero-shot VQA. The image's prefix (noise drawn as in `generate`, seeded by `noise_seed`), then BOS and
        config.vqa_prompt as text; beam search with VQA_GENERATE_DEFAULTS (5 beams, 1 to 10 new tokens, length
        penalty -1), no reranking. `questions`: one string per image, or one string for all. Returns the decoded
        text after the prompt, stripped and cut at its first line break. Keyword arguments go to `generate`."""
        processor = processor or self.processor
        if processor is None:
            raise ValueError("answer needs the LM tokenizer: pass processor=MacCapProcessor(...) or attach one as "
                             "model.processor")
        refused = [name for name in ("rerank", "output_candidates", "return_dict_in_generate")
                   if generate_kwargs.pop(name, False)]
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            refused.append("num_return_sequences")
        if refused:
            raise ValueError(f"answer gives one beam-search answer per question; it does not take {refused}")
        self._check_pixel_values(pixel_values)
        questions = _check_questions(questions, pixel_values.shape[0])
        input_ids, attention_mask = processor.prompt_inputs(self.format_vqa_prompts(questions))
        sequences = self.generate(pixel_values, input_ids, attention_mask, rerank=False, processor=processor,
                                  **{**VQA_GENERATE_DEFAULTS, **generate_kwargs})
        texts = processor.tokenizer.batch_decode(sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
        return [(text.strip().splitlines() or [""])[0].strip() for text in texts]


def _check_generate_arguments(pixel_values, rerank, processor, max_decode_rows, generate_kwargs):
    if pixel_values is None:
        raise ValueError("generate needs pixel_values (use the processor on your images)")
    if max_decode_rows is not None and (type(max_decode_rows) is not int or max_decode_rows < 1):
        raise ValueError(f"max_decode_rows must be a positive int or None, got {max_decode_rows!r}")
    if rerank and generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("num_return_sequences > 1 cannot be combined with reranking; pass rerank=False")
    if rerank and processor is None:
        raise ValueError("reranking needs the tokenizers: pass processor=MacCapProcessor(...), attach one as "
                         "model.processor, or pass rerank=False")


def _check_questions(questions, batch):
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, (list, tuple)):
        raise ValueError(f"questions must be a string or a list of strings, got {type(questions).__name__}")
    if len(questions) == 1 and batch > 1:
        questions = list(questions) * batch
    if len(questions) != batch:
        raise ValueError(f"got {batch} images but {len(questions)} questions")
    for i, question in enumerate(questions):
        if not isinstance(question, str):
            raise ValueError(f"question {i} must be a string, got {type(question).__name__}")
        if not question.strip():
            raise ValueError(f"question {i} is empty")
    return list(questions)


MacCapConfig.register_for_auto_class()
MacCapForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["MacCapConceptOutput", "MacCapForConditionalGeneration", "MacCapPreTrainedModel", "MacCapProjector",
           "noise_injection", "patch_concept_features", "salient_concepts", "sample_noise", "selected_patches"]

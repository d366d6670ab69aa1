"""PCM-Net training of MacCap on (image, caption) pairs (Luo et al., ECCV-24; not shipped as remote code).

Synthetic images (`maccap synthesize`) have defects in their salient regions. PCM-Net adds, each switchable:
- salient visual concepts: a concept vocabulary embedded by CLIP's text tower with prompt ensembling (cached as the
  text features of `training.py` are), and per image its top concepts (`MacCapForConditionalGeneration.
  get_concept_features`, in the model because inference needs them too);
- patch-wise cross-modal mix-up (training only): the selected patches' tokens are replaced by the projected
  concept features, e_p <- e_p (1 - m_p) + Linear(v_p) m_p; at inference the concept tokens are extra keys;
- a CLIP-weighted, label-smoothed token loss: w = clamp(alpha * cos(image, caption), 0, 1) per pair, with an
  optional focal factor (1 - p_y)^gamma per token.

The aligner's keys (config.patch_keys) are [k subregion features with noise | the patch tokens (mixed up in
training) | at inference, the selected patches' concept tokens]; README, "Synthetic pairs and PCM-Net".
"""

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..modeling_maccap import noise_injection, sample_noise
from ..transformers_compat import accepts_argument
from .errors import MacCapError, listing, read_text
from .training import (FEATURE_COLUMN, MacCapTrainer, cache_text_features, default_cache_dir, save_run,
                       token_accuracy_counts)

logger = logging.getLogger(__name__)

DEFAULT_CONCEPTS_FILE = Path(__file__).with_name("concepts.txt")
# Prompt ensembling: a concept's embedding is the normalised mean of its normalised embeddings in these prompts.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.", "a photo of a small {}.", "a photo of a large {}.",
                     "there is a {} in the scene.")
# The reference training schedule of method.md (AdamW 1e-4, 200 warm-up steps, cosine to 10%, clip 1, batch 32).
DEFAULT_TRAINING_ARGUMENTS = {
    "learning_rate": 1e-4, "weight_decay": 0.01, "warmup_steps": 200, "lr_scheduler_type": "cosine_warmup_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1, "warmup_lr_rate": 0.01}, "max_grad_norm": 1.0,
    "per_device_train_batch_size": 32, "num_train_epochs": 8, "logging_steps": 100, "save_strategy": "no",
    "seed": 42, "report_to": "none",
}


@dataclass(frozen=True)
class PCMSettings:
    """PCM-Net's training switches and constants, with the paper's defaults (the model's own ones, the concept
    counts and temperature, are MacCapConfig fields)."""

    mixup: bool = True  # patch-wise cross-modal mix-up, and concept tokens at inference
    weighted_loss: bool = True  # the CLIP-weighted loss
    clip_weight_alpha: float = 2.5  # 2.5 for ViT-B/32, 4.0 for ViT-L/14
    label_smoothing: float = 0.1
    # The released code's focal factor (1 - p_y)^gamma, gamma 2 there; 0 (off) here: the demo measured both
    # (README, "Synthetic pairs and PCM-Net").
    focal_gamma: float = 0.0
    feature_noise_variance: float = 0.016  # Gaussian noise on the image features in training

    def __post_init__(self):
        for name in ("clip_weight_alpha", "focal_gamma", "feature_noise_variance"):
            if getattr(self, name) < 0:
                raise MacCapError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise MacCapError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


# ------------------------------------------------------------------------------------------ concept vocabulary
def read_concepts(path=None):
    """The concepts of a words file (one a line; blank lines and '#' comments skipped), default maccap's list.
    A repeated concept or an empty file is one MacCapError."""
    path = Path(path) if path else DEFAULT_CONCEPTS_FILE
    lines = [line.strip() for line in read_text(path, "concepts file").splitlines()]
    concepts = [line for line in lines if line and not line.startswith("#")]
    if not concepts:
        raise MacCapError(f"concepts file {path}: no concept in it")
    repeated = sorted({c for c in concepts if concepts.count(c) > 1})
    if repeated:
        raise MacCapError(f"concepts file {path}: repeated concepts {listing(repeated)}")
    return concepts


def _check_templates(templates):
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise MacCapError(f"concept templates must each contain '{{}}', got {listing(bad) if bad else 'none'}")


def concept_embeddings(model, processor, concepts, templates=DEFAULT_TEMPLATES, cache_dir=None):
    """(concepts, joint_dim): each concept's prompt-ensembled CLIP text embedding, the normalised mean of its
    normalised embeddings in every template. The prompts' embeddings are cached as a corpus's text features are
    (`training.cache_text_features`): computed once per (prompts, CLIP text tower)."""
    import datasets

    _check_templates(templates)
    prompts = [template.format(concept) for concept in concepts for template in templates]
    features = cache_text_features(datasets.Dataset.from_dict({"caption": prompts}), model, processor,
                                   cache_dir or default_cache_dir())
    embeds = features[:][FEATURE_COLUMN].view(len(concepts), len(templates), -1)  # torch format: one tensor
    return F.normalize(F.normalize(embeds.float(), dim=-1).mean(1), dim=-1)


# ----------------------------------------------------------------------------------------- mix-up and the loss
def mixup(patch_embeds, concept_tokens, selected):
    """Patch-wise cross-modal mix-up: e_p <- e_p (1 - m_p) + c_p m_p, m_p = 1 for the selected patches."""
    m = selected.unsqueeze(-1).to(patch_embeds.dtype)
    return patch_embeds * (1 - m) + concept_tokens.to(patch_embeds.dtype) * m


def clip_weights(image_embeds, text_embeds, alpha):
    """PCM-Net's per-pair loss weight w = clamp(alpha * cos(image, caption), 0, 1)."""
    cos = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
    return (alpha * cos).clamp(0, 1)


def weighted_caption_loss(logits, labels, weights=None, label_smoothing=0.1, focal_gamma=0.0):
    """The caption loss of one batch: logits[:, t] predicts labels[:, t + 1] (-100 is not scored). Each token's
    label-smoothed cross-entropy (torch's: (1 - eps) of the target, eps spread evenly over the vocabulary), times
    (1 - p_target)^focal_gamma, times its pair's weight (None: 1), averaged over the scored tokens."""
    labels = labels[:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none",
                                 label_smoothing=label_smoothing)
    scored = labels != -100
    if focal_gamma:
        p_target = logits.softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_loss = token_loss * (1 - p_target) ** focal_gamma
    if weights is not None:
        token_loss = token_loss * weights.to(token_loss.device).unsqueeze(1)
    return (token_loss * scored).sum() / scored.sum().clamp(min=1)


# -------------------------------------------------------------------------------------------- the forward pass
def aligner_keys(model, pixel_values, settings, training=True):
    """The aligner's keys of a training step and the images' CLIP embeddings: the k subregion features with
    `feature_noise_variance` noise (torch's RNG), then with config.patch_keys the patch tokens, the selected ones
    mixed up with their projected concept features (config.concepts and `settings.mixup`)."""
    with torch.no_grad():  # CLIP is frozen
        subregions = model.get_subregion_features(pixel_values)
    features = subregions.subregion_features
    keys = noise_injection(features, sample_noise(features.shape, settings.feature_noise_variance,
                                                  device=features.device))
    if model.config.patch_keys:
        patches = subregions.token_embeds[:, 1:]
        if model.config.concepts is not None and settings.mixup and training:
            concepts = model.get_concept_features(subregions)
            tokens = model.concept_projection(concepts.concept_features.to(model.concept_projection.weight.dtype))
            patches = mixup(patches, tokens, concepts.selected)
        keys = torch.cat([keys, patches.to(keys.dtype)], dim=1)
    return keys, subregions.image_embeds


def caption_logits(model, prefix, input_ids, attention_mask):
    """The LM's logits at the caption tokens after a prefix (as MacCap's forward computes them)."""
    embed = model.get_input_embeddings()
    input_ids = input_ids.to(embed.weight.device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    prefix = prefix.to(embed.weight.device, embed.weight.dtype)
    inputs_embeds = torch.cat([prefix, embed(input_ids)], dim=1)
    mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
    text_len = input_ids.shape[1]
    keep = {"logits_to_keep": text_len} if accepts_argument(model.language_model, "logits_to_keep") else {}
    return model.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, **keep).logits[:, -text_len:]


def pcm_loss(model, batch, settings):
    """(loss, logits, weights) of a batch {pixel_values, input_ids, attention_mask, labels, clip_input_ids,
    clip_attention_mask}: PCM-Net's objective with `settings`' switches."""
    keys, image_embeds = aligner_keys(model, batch["pixel_values"], settings, training=model.training)
    prefix = model.projector(keys.to(model.projector.queries.weight.device))
    logits = caption_logits(model, prefix, batch["input_ids"], batch.get("attention_mask"))
    weights = None
    if settings.weighted_loss:
        with torch.no_grad():
            text = model.get_text_embeds(batch["clip_input_ids"], batch.get("clip_attention_mask"))
        weights = clip_weights(image_embeds, text, settings.clip_weight_alpha)
    loss = weighted_caption_loss(logits, batch["labels"], weights, settings.label_smoothing, settings.focal_gamma)
    return loss, logits, weights


class PairCollator:
    """(image, caption) rows -> pixel values, the captions' LM inputs and their CLIP tokens (for the weights)."""

    def __init__(self, processor, image_column="image", caption_column="caption"):
        self.processor, self.image_column, self.caption_column = processor, image_column, caption_column

    def __call__(self, rows):
        captions = [row[self.caption_column] for row in rows]
        images = [row[self.image_column].convert("RGB") for row in rows]
        clip = self.processor.clip_text_inputs(captions)
        return {"pixel_values": self.processor(images=images)["pixel_values"],
                **self.processor.caption_lm_inputs(captions),
                "clip_input_ids": clip["input_ids"], "clip_attention_mask": clip["attention_mask"]}


class PCMTrainer(MacCapTrainer):
    """The Trainer on PCM-Net's objective (`pcm_loss`), logging the token accuracy as MacCapTrainer does."""

    def __init__(self, *args, pcm_settings=PCMSettings(), **kwargs):
        super().__init__(*args, **kwargs)
        self.pcm_settings = pcm_settings

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, logits, _ = pcm_loss(self.accelerator.unwrap_model(model), inputs, self.pcm_settings)
        key = "loss" if model.training else "eval_loss"
        counts = token_accuracy_counts(logits.detach(), inputs["labels"])
        self._token_counts[key] = self._token_counts.get(key, 0) + counts
        return (loss, {"logits": logits}) if return_outputs else loss


# ------------------------------------------------------------------------------------------------- training
def train_pcm(pairs, output_dir, *, clip, lm, settings=PCMSettings(), concepts=None, templates=DEFAULT_TEMPLATES,
              maccap=None, training_arguments=None, max_caption_length=25, cache_dir=None, callbacks=None,
              collator=None):
    """Train MacCap's projector on (image, caption) `pairs` (a datasets Dataset with "image" and "caption", as
    `synthesize.read_pairs` gives it) with PCM-Net's switches in `settings`, and save the model to `output_dir`.

    The model gets config.patch_keys; with `settings.mixup` also the concept vocabulary (`concepts`: a list, a words
    file, or None for maccap's default list), embedded with `templates`. `maccap`: other MacCapConfig fields;
    `training_arguments`: TrainingArguments overriding DEFAULT_TRAINING_ARGUMENTS. `collator(processor)`: builds
    the batches instead of `PairCollator` (they must hold what `pcm_loss` reads). Returns the output folder."""
    from transformers import TrainingArguments, set_seed

    from ..modeling_maccap import MacCapForConditionalGeneration

    if len(pairs) == 0:
        raise MacCapError("no (image, caption) pair to train on")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # PCMTrainer computes the loss on the unwrapped model, outside DistributedDataParallel's forward.
        raise MacCapError("train-pcm runs in one process; it is not written for torchrun / several processes yet")
    arguments = {**DEFAULT_TRAINING_ARGUMENTS, **(training_arguments or {})}
    args = TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, label_names=["labels"],
                             **arguments)
    if settings.mixup and not isinstance(concepts, (list, tuple)):
        concepts = read_concepts(concepts)
    set_seed(args.seed)
    fields = {**(maccap or {}), "patch_keys": True, "concepts": list(concepts) if settings.mixup else None}
    try:
        model = MacCapForConditionalGeneration.from_pretrained_components(clip=clip, lm=lm, **fields)
    except OSError as error:
        raise MacCapError(f"cannot load CLIP {clip!r} and LM {lm!r}: {str(error).splitlines()[0]}") from None
    processor = model.processor
    processor.max_caption_length = max_caption_length
    if settings.mixup:
        with torch.no_grad():
            model.concept_embeds.copy_(concept_embeddings(model, processor, concepts, templates, cache_dir))
    trainer = PCMTrainer(model=model, args=args, train_dataset=pairs,
                         data_collator=(collator or PairCollator)(processor), processing_class=processor,
                         callbacks=callbacks, pcm_settings=settings)
    trainer.train()
    # The weights hold concept_embeds too.
    return save_run(trainer, output_dir, files={"pcm_settings.json": json.dumps(dataclasses.asdict(settings), indent=2)})


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(commands):
    fit = commands.add_parser("train-pcm", help="train on (image, caption) pairs with PCM-Net's salient concepts, "
                                                "mix-up and CLIP-weighted loss")
    fit.add_argument("pairs", help="the pairs: a `maccap synthesize` output folder, a save_to_disk folder, an image "
                                   "folder with metadata, or a Hub dataset id")
    fit.add_argument("--clip", required=True, help="CLIP checkpoint (Hub id, folder, or open_clip:ARCH/TAG)")
    fit.add_argument("--lm", required=True, help="causal LM checkpoint (Hub id or folder)")
    fit.add_argument("--output-dir", required=True, help="where the trained model goes")
    fit.add_argument("--split", default="train", help="split of a Hub dataset (default: %(default)s)")
    fit.add_argument("--image-column", default="image")
    fit.add_argument("--caption-column", default="caption")
    fit.add_argument("--concepts", help="words file, one concept a line (default: maccap's list, tools/concepts.txt)")
    fit.add_argument("--concept-template", action="append", help="prompt with '{}' for the concept (repeatable; "
                                                                 "default: 8 photo prompts)")
    fit.add_argument("--no-mixup", action="store_true", help="no patch-wise mix-up and no concept tokens")
    fit.add_argument("--no-weighted-loss", action="store_true", help="every pair weighs 1")
    for name, default in (("clip-weight-alpha", 2.5), ("label-smoothing", 0.1), ("focal-gamma", 0.0),
                          ("feature-noise-variance", 0.016)):
        fit.add_argument(f"--{name}", type=float, default=default, help="(default: %(default)s)")
    fit.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    fit.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="a TrainingArguments value (VALUE read as JSON), e.g. learning_rate=3e-4 (repeatable)")
    fit.add_argument("--maccap", action="append", default=[], metavar="NAME=VALUE",
                     help="a MacCapConfig field (VALUE read as JSON), e.g. num_queries=16 (repeatable)")
    fit.set_defaults(run=run)
    return fit


def run(args):
    from huggingface_hub.errors import StrictDataclassError

    from .synthesize import read_pairs
    from .training import _argument_overrides

    settings = PCMSettings(mixup=not args.no_mixup, weighted_loss=not args.no_weighted_loss,
                           clip_weight_alpha=args.clip_weight_alpha, label_smoothing=args.label_smoothing,
                           focal_gamma=args.focal_gamma, feature_noise_variance=args.feature_noise_variance)
    arguments = _argument_overrides(args.set)
    if args.max_steps is not None:
        arguments["max_steps"] = args.max_steps
    pairs = read_pairs(args.pairs, image_column=args.image_column, caption_column=args.caption_column,
                       split=args.split)
    try:
        out = train_pcm(pairs, args.output_dir, clip=args.clip, lm=args.lm, settings=settings,
                        concepts=args.concepts, templates=tuple(args.concept_template or DEFAULT_TEMPLATES),
                        maccap=_argument_overrides(args.maccap), training_arguments=arguments)
    except MacCapError:
        raise
    except (ValueError, StrictDataclassError) as error:  # a MacCapConfig field or TrainingArguments value refused
        raise MacCapError(" ".join(str(error).split())) from None
    print(f"trained on {len(pairs)} pairs: {out}")
    return 0

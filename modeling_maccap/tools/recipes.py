"""`maccap train --recipe supervised|clip-reward`: the recipes that see images (not shipped as remote code).

- supervised: labelled (image, caption) pairs; the projector is conditioned on the image's own subregion features
  with the inference noise (fresh at every step), as `generate()` conditions it, and learns the caption by
  cross-entropy, as the text-only recipe does. `text_weight` > 0 mixes in the text-only objective on the corpus.
- clip-reward: unlabelled images; self-critical policy gradient on the CLIP reward (`clip_reward.py`), guarded by a
  KL to the starting model (`kl_weight`) and / or the supervised (`pairs`, `supervised_weight`) and text-only
  (`text_weight`) cross-entropy.

Every recipe trains on the transformers `Trainer` (`RecipeTrainer`): its rows are (source, index) pairs over the
pairs, captions and images, so the Trainer's sampler, resume-after-kill and data-parallel sharding hold as in the
text-only recipe; the folder it writes is a MacCap checkpoint like any other.
"""

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch

from .errors import MacCapError, listing

logger = logging.getLogger(__name__)

RECIPES = ("text", "supervised", "clip-reward")
SOURCES = ("pairs", "captions", "images")  # the `source` of a row, by its index


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
    """A recipe and its settings (a hub config's `training.recipe`; `--recipe`, `--pairs`, `--images`,
    `--init-from`, `--recipe-set NAME=VALUE` on the command line). Paths are the caller's (the hub config's are
    taken relative to its folder)."""

    name: str = "text"
    pairs: str | None = None  # labelled pairs: a file, a folder with a captions file, or a datasets image dataset
    pairs_image_column: str | None = None  # default: the first of pairs.IMAGE_COLUMNS present
    pairs_caption_column: str = "caption"
    pairs_split: str = "train"
    images: str | None = None  # a folder of unlabelled images (clip-reward)
    init_from: str | None = None  # a MacCap checkpoint to refine (default: a fresh projector on the components)
    supervised_weight: float = 1.0  # weight of the cross-entropy on the pairs
    text_weight: float = 0.0  # weight of the text-only cross-entropy on the hub config's corpus (0: not read)
    num_samples: int = 4  # captions sampled per image (clip-reward)
    baseline: str = "greedy"  # "greedy" (self-critical) or "mean" (of the image's other samples)
    reward_weight: float = 2.5  # w of CLIPScore, r = w * max(cos, 0)
    kl_weight: float = 0.0  # weight of the per-token KL to the starting model
    temperature: float = 1.0  # of the sampling
    max_new_tokens: int | None = None  # of each sample (default: the model's generation config)

    def check(self, where="recipe"):
        from .clip_reward import BASELINES

        if self.name not in RECIPES:
            raise MacCapError(f"{where}: name {self.name!r} is not one of {', '.join(RECIPES)}")
        if self.name == "supervised" and not self.pairs:
            raise MacCapError(f"{where}: the supervised recipe needs pairs (--pairs)")
        if self.name == "clip-reward" and not self.images:
            raise MacCapError(f"{where}: the clip-reward recipe needs a folder of images (--images)")
        if self.name == "text" and (self.pairs or self.images):
            raise MacCapError(f"{where}: the text recipe trains on captions alone; --pairs / --images need "
                              "--recipe supervised or clip-reward")
        if self.baseline not in BASELINES:
            raise MacCapError(f"{where}: baseline {self.baseline!r} is not one of {', '.join(BASELINES)}")
        if self.num_samples < 1 or (self.baseline == "mean" and self.num_samples < 2):
            raise MacCapError(f"{where}: num_samples must be >= 1 (>= 2 with the 'mean' baseline), got "
                              f"{self.num_samples}")
        for name in ("supervised_weight", "text_weight", "kl_weight", "reward_weight"):
            if getattr(self, name) < 0:
                raise MacCapError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise MacCapError(f"{where}: temperature must be > 0 and max_new_tokens >= 1")
        return self

    def card_settings(self):
        """The settings that shape the recipe (for the model card), without the data paths."""
        fields = {"supervised": ("supervised_weight", "text_weight"),
                  "clip-reward": ("num_samples", "baseline", "reward_weight", "kl_weight", "supervised_weight",
                                  "text_weight", "temperature", "max_new_tokens"),
                  "text": ()}[self.name]
        return {name: getattr(self, name) for name in fields}


def recipe_from_dict(data, where="recipe", relative_to=None):
    """A checked `RecipeSettings` from a hub config's `training.recipe` (paths relative to `relative_to`)."""
    known = {f.name for f in dataclasses.fields(RecipeSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MacCapError(f"{where}: unknown setting(s) {', '.join(unknown)}; the settings are {listing(sorted(known))}")
    data = dict(data)
    if relative_to is not None:
        for name in ("pairs", "images", "init_from"):
            # A Hub id (no such local path and no suffix) stays as it is.
            if data.get(name) and (Path(relative_to) / data[name]).exists():
                data[name] = str((Path(relative_to) / data[name]).resolve())
    try:
        return RecipeSettings(**data).check(where)
    except TypeError as error:
        raise MacCapError(f"{where}: {error}") from None


# ----------------------------------------------------------------------------------------------------- data
def recipe_rows(sizes):
    """The training rows, a `datasets.Dataset` of (source, index): every row of each source, in turn."""
    import datasets

    sources, indices = [], []
    for source, size in sizes.items():
        sources += [SOURCES.index(source)] * size
        indices += list(range(size))
    return datasets.Dataset.from_dict({"source": sources, "index": indices})


class RecipeCollator:
    """(source, index) rows -> a batch of up to three parts: "pairs" (the pairs' LM tokens and pixel values, noise
    drawn afresh), "captions" (text-only inputs, as `training.CaptionCollator` makes them) and "images"."""

    def __init__(self, processor, pairs=None, captions=None, images=None):
        from .training import CaptionCollator

        self.processor, self.caption_collator = processor, CaptionCollator(processor)
        self.data = {"pairs": pairs, "captions": captions, "images": images}

    def __call__(self, rows):
        from .pairs import pixel_values

        batch = {}
        for code, source in enumerate(SOURCES):
            indices = [int(row["index"]) for row in rows if int(row["source"]) == code]
            if not indices:
                continue
            part = self.data[source].select(indices)
            if source == "captions":
                batch[source] = self.caption_collator([part[i] for i in range(len(part))])
            elif source == "pairs":
                batch[source] = {**self.processor.caption_lm_inputs(part["caption"]),
                                 "pixel_values": pixel_values(self.processor, part["image"]), "noise_seed": None}
            else:
                batch[source] = {"pixel_values": pixel_values(self.processor, part["image"])}
        return batch


# -------------------------------------------------------------------------------------------------- trainer
def _trainer_class():
    from .training import MacCapTrainer

    class RecipeTrainer(MacCapTrainer):
        """The Trainer on a recipe's batches: loss = supervised_weight * CE(pairs) + text_weight * CE(captions)
        + policy gradient + kl_weight * KL (images). Each part is computed on the unwrapped model, so under DDP the
        gradients of the trainable parameters are averaged across processes here, after each backward that ends an
        accumulation (the parts are several forwards; DDP's own hooks expect one)."""

        def __init__(self, *args, recipe, reference=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.recipe, self.reference = recipe, reference
            self._recipe_logs = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from .clip_reward import clip_reward_terms

            policy = self.accelerator.unwrap_model(model)
            recipe, terms = self.recipe, {}
            if "pairs" in inputs:
                terms["supervised"] = (recipe.supervised_weight, policy(**inputs["pairs"]).loss)
            if "captions" in inputs:
                terms["text"] = (recipe.text_weight, policy(**inputs["captions"]).loss)
            if "images" in inputs:
                parts = clip_reward_terms(policy, inputs["images"]["pixel_values"], recipe, self.reference,
                                          self.processing_class)
                terms["policy_gradient"] = (1.0, parts.pop("policy_gradient"))
                if "kl" in parts:
                    terms["kl"] = (recipe.kl_weight, parts.pop("kl"))
                for name, value in parts.items():
                    terms[name] = (0.0, value)  # statistics, logged only
            loss = sum(weight * value for weight, value in terms.values() if weight)
            if not torch.is_tensor(loss):  # no weighted part in this batch (e.g. only zero-weight captions)
                loss = sum(p.sum() * 0 for p in policy.parameters() if p.requires_grad)
            if model.training:
                for name, (_, value) in terms.items():
                    total, count = self._recipe_logs.get(name, (0.0, 0))
                    self._recipe_logs[name] = (total + float(value.detach()), count + 1)
            return (loss, None) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
                for parameter in self.accelerator.unwrap_model(model).parameters():
                    if parameter.requires_grad:
                        if parameter.grad is None:
                            parameter.grad = torch.zeros_like(parameter)
                        torch.distributed.all_reduce(parameter.grad)
                        parameter.grad /= self.accelerator.num_processes
            return loss

        def log(self, logs, start_time=None):
            if "loss" in logs and self._recipe_logs:
                for name, (total, count) in sorted(self._recipe_logs.items()):
                    logs[name] = total / count  # this process's mean since the last log
                self._recipe_logs = {}
            super().log(logs, start_time)

    return RecipeTrainer


# ------------------------------------------------------------------------------------------------- training
def starting_model(init_from, hub_config, clip, lm, finetune_lm):
    """The model a recipe trains: the MacCap checkpoint `init_from` (CLIP frozen, the LM unless `finetune_lm`), or
    without it a fresh projector on the CLIP and LM checkpoints (`training.model_from_components`)."""
    from ..modeling_maccap import MacCapForConditionalGeneration

    if init_from:
        try:
            model = MacCapForConditionalGeneration.from_pretrained(init_from)
        except OSError as error:
            raise MacCapError(f"--init-from {init_from}: not a MacCap checkpoint: "
                              f"{str(error).splitlines()[0]}") from None
        if model.processor is None:
            raise MacCapError(f"--init-from {init_from}: the checkpoint has no processor files")
        model.clip.requires_grad_(False)
        model.language_model.requires_grad_(finetune_lm)
        return model
    from .training import model_from_components

    return model_from_components(hub_config, clip, lm, finetune_lm)


def train_recipe(hub_config, output_dir, recipe, *, clip=None, lm=None, max_steps=None, precision="auto",
                 finetune_lm=None, resume=False, feature_cache=True, cache_dir=None, push_to_hub=None, callbacks=None):
    """`training.train` for the supervised and clip-reward recipes (`recipe`, a `RecipeSettings`): the same
    arguments, checks and output folder. Returns the output folder."""
    from transformers import TrainingArguments, set_seed

    from .pairs import load_image_folder, load_pairs
    from .training import _precision, cache_text_features, default_cache_dir, prepare_run, save_run, split_corpus

    recipe.check()
    output_dir, checkpoint, arguments = prepare_run(hub_config, output_dir, resume, push_to_hub, max_steps)
    if arguments.get("eval_strategy", "no") != "no":
        raise MacCapError(f"{hub_config.path}: training.arguments.eval_strategy: the {recipe.name} recipe has no "
                          "eval loss; set it to \"no\" (`--set eval_strategy=no`)")
    args = TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, **_precision(precision),
                             **arguments)

    finetune_lm = hub_config.finetune_lm if finetune_lm is None else finetune_lm
    set_seed(args.seed)
    model = starting_model(recipe.init_from, hub_config, clip or hub_config.clip, lm or hub_config.lm, finetune_lm)
    processor = model.processor
    processor.max_caption_length = hub_config.max_caption_length
    # The starting model's projector, frozen: the KL guard's reference (the LM and CLIP are shared and frozen).
    reference = copy.deepcopy(model.projector).eval().requires_grad_(False) if (
        recipe.name == "clip-reward" and recipe.kl_weight > 0) else None
    if reference is not None and finetune_lm:
        raise MacCapError("kl_weight > 0 with --finetune-lm: the KL guard's reference shares the LM; freeze it")

    data = {}
    with args.main_process_first(desc="reading the recipe's data"):
        if recipe.pairs and (recipe.name == "supervised" or recipe.supervised_weight > 0):
            data["pairs"] = load_pairs(recipe.pairs, recipe.pairs_image_column, recipe.pairs_caption_column,
                                       recipe.pairs_split)
        if recipe.text_weight > 0:
            data["captions"], _ = split_corpus(hub_config, tokenizer=processor.tokenizer)
            if feature_cache:
                model.clip.to(args.device)
                data["captions"] = cache_text_features(data["captions"], model, processor,
                                                       cache_dir or default_cache_dir())
        if recipe.name == "clip-reward":
            data["images"] = load_image_folder(recipe.images)
    rows = recipe_rows({source: len(part) for source, part in data.items()})
    logger.warning(f"recipe {recipe.name}: " + ", ".join(f"{len(part)} {source}" for source, part in data.items()))

    trainer = _trainer_class()(model=model, args=args, train_dataset=rows,
                               data_collator=RecipeCollator(processor, **data), processing_class=processor,
                               callbacks=callbacks, recipe=recipe, reference=reference)
    if reference is not None:
        reference.to(args.device)
    trainer.train(resume_from_checkpoint=checkpoint if resume else None)
    return save_run(trainer, output_dir, files={"recipe.json": json.dumps(dataclasses.asdict(recipe), indent=2)},
                    hub_config=hub_config, push_to_hub=push_to_hub)


# -------------------------------------------------------------------------------------------------- the card
def _data_name(value):
    path = Path(value)
    return f"`{path.name}`" if path.exists() else f"[{value}](https://huggingface.co/datasets/{value})"


def recipe_paragraph(hub_config, corpus, trained):
    """The model card's account of the recipe and data that made the checkpoint (`hub.model_card`)."""
    reproduce = (f"Reproduce it with the `maccap` package (`maccap train --hub-config {hub_config.path.name}`); "
                 f"captions are cut at {hub_config.max_caption_length} LM tokens.")
    recipe = (recipe_from_dict(hub_config.recipe, relative_to=hub_config.path.parent) if hub_config.recipe
              else RecipeSettings())
    if recipe.name == "text":
        return (f"Text only: {trained} trained on {corpus}, with CLIP text embeddings as the condition. "
                + reproduce)
    start = (f"Refined from the checkpoint `{Path(recipe.init_from).name}`" if recipe.init_from
             else "Trained from a fresh projector")
    if recipe.name == "supervised":
        data = (f"labelled (image, caption) pairs from {_data_name(recipe.pairs)}, conditioned on each image's "
                "own subregion features with the inference noise, cross-entropy on its caption")
    else:
        baseline = ("the reward of a greedy caption (self-critical)" if recipe.baseline == "greedy"
                    else "the mean reward of the image's other samples")
        data = (f"unlabelled images from {_data_name(recipe.images)}: {recipe.num_samples} captions sampled per "
                f"image, rewarded with {recipe.reward_weight} x max(CLIP cosine, 0) by the model's own CLIP, "
                f"baseline {baseline}, REINFORCE on the projector; KL weight to the starting model "
                f"{recipe.kl_weight}")
        if recipe.pairs and recipe.supervised_weight:
            data += f", cross-entropy on the pairs of {_data_name(recipe.pairs)} (weight {recipe.supervised_weight})"
    if recipe.text_weight:
        data += f", mixed with the text-only objective on {corpus} (weight {recipe.text_weight})"
    settings = ", ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in recipe.card_settings().items())
    return (f"Recipe `{recipe.name}`: {start}; {trained} trained on {data}. Recipe settings: {settings}. "
            + reproduce)


# ------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser):
    """`maccap train`'s recipe options."""
    parser.add_argument("--recipe", choices=RECIPES, help="text (captions alone, the default), supervised (labelled "
                                                          "--pairs) or clip-reward (unlabelled --images); default: "
                                                          "the hub config's training.recipe, else text")
    parser.add_argument("--pairs", help="labelled pairs: a JSONL/CSV/JSON/Parquet file of image paths and captions, "
                                        "a folder with the images and captions.jsonl/.csv, or a datasets image "
                                        "dataset (save_to_disk folder or Hub id)")
    parser.add_argument("--pairs-image-column", help="image column of --pairs (default: image, file_name, "
                                                     "image_path or path, the first present)")
    parser.add_argument("--pairs-caption-column", help="caption column of --pairs (default: caption)")
    parser.add_argument("--images", help="a folder of unlabelled images (clip-reward)")
    parser.add_argument("--init-from", help="a MacCap checkpoint folder to refine (default: the hub config's "
                                            "recipe.init_from, else a fresh projector)")
    parser.add_argument("--recipe-set", action="append", default=[], metavar="NAME=VALUE",
                        help="a recipe setting, e.g. kl_weight=0.1, baseline=mean, num_samples=4, text_weight=0.5 "
                             "(repeatable; VALUE is read as JSON)")


def recipe_from_arguments(args, hub_config):
    """The recipe of a `maccap train` run: the hub config's, with the command line's options over it (a --recipe
    other than the hub config's starts from the defaults); None for the text-only recipe."""
    from .training import _argument_overrides

    settings = dict(getattr(hub_config, "recipe", None) or {})
    if args.recipe is not None and args.recipe != settings.get("name", "text"):
        settings = {}  # another recipe than the hub config's: none of its settings apply
    for name in ("pairs", "images", "init_from"):  # the hub config's paths are relative to its folder
        if settings.get(name) and (hub_config.path.parent / settings[name]).exists():
            settings[name] = str((hub_config.path.parent / settings[name]).resolve())
    for name, value in (("name", args.recipe), ("pairs", args.pairs), ("images", args.images),
                        ("init_from", args.init_from), ("pairs_image_column", args.pairs_image_column),
                        ("pairs_caption_column", args.pairs_caption_column)):
        if value is not None:
            settings[name] = str(Path(value).resolve()) if name in ("pairs", "images", "init_from") and Path(
                value).exists() else value
    settings.update(_argument_overrides(args.recipe_set))
    recipe = recipe_from_dict(settings, "--recipe-set" if args.recipe_set else "recipe")
    return None if recipe.name == "text" else recipe


def run(args, hub_config, output_dir, recipe):
    """`maccap train` with a supervised or clip-reward `recipe` (`training.run` dispatches here)."""
    hub_config = dataclasses.replace(hub_config, recipe=dataclasses.asdict(recipe))  # the card names this run's
    train_recipe(hub_config, output_dir, recipe, clip=args.clip, lm=args.lm, max_steps=args.max_steps,
                 precision=args.precision, finetune_lm=args.finetune_lm or None, resume=args.resume,
                 feature_cache=not args.no_feature_cache, cache_dir=args.feature_cache_dir,
                 push_to_hub=args.push_to_hub)
    print(f"trained {hub_config.model_name} ({recipe.name} recipe): {output_dir}")
    return 0

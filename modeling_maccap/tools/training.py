"""Text-only training of the MacCap projector with the transformers Trainer (not shipped as remote code).

`train(hub_config, output_dir)` loads the variant's components and caption corpus, caches the corpus's CLIP text
features once, trains, and writes a folder that `AutoModel.from_pretrained(..., trust_remote_code=True)` and
`pipeline("image-to-text")` load. Under `torchrun` the same call trains data-parallel.
"""

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from transformers import Trainer, set_seed

from .errors import MacCapError
from .hub_config import check_training_arguments, load_hub_config

logger = logging.getLogger(__name__)

CAPTION_BUILDERS = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FEATURE_COLUMN = "clip_text_embeds"


def _read_corpus(spec):
    import datasets

    if "hub_id" in spec:
        where = f"Hub dataset {spec['hub_id']}" + (f" ({spec['config']})" if spec.get("config") else "")
        try:
            return datasets.load_dataset(spec["hub_id"], spec.get("config"), split=spec["split"]), where
        except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
            raise MacCapError(f"cannot load {where}, split {spec['split']!r}: {error}") from None
    file = Path(spec["file"])
    where = f"caption file {file}"
    if not file.is_file():
        raise MacCapError(f"{where} does not exist")
    try:
        if file.suffix == ".json":  # the reference format: a JSON list of caption strings (or of records)
            data = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise MacCapError(f"{where}: expected a JSON list, got {type(data).__name__}")
            if all(isinstance(row, dict) for row in data):
                return datasets.Dataset.from_list(data), where
            return datasets.Dataset.from_dict({"caption": [row if isinstance(row, str) else None for row in data]}), where
        if file.suffix not in CAPTION_BUILDERS:
            raise MacCapError(f"{where}: unknown format {file.suffix!r}; use .json, {', '.join(CAPTION_BUILDERS)}")
        return datasets.load_dataset(CAPTION_BUILDERS[file.suffix], data_files=str(file), split="train"), where
    except MacCapError:
        raise
    except Exception as error:  # noqa: BLE001 - json, arrow and datasets errors all mean "unreadable"
        raise MacCapError(f"cannot read {where}: {error}") from None


def load_captions(spec, tokenizer=None, max_tokens=None):
    """A `datasets.Dataset` with one string column "caption" from a corpus spec (a hub config's `corpus`).
    A column may hold one caption or a list of captions per row; empty, whitespace-only and non-string values,
    and with a `tokenizer`, captions longer than `max_tokens` of its tokens, are dropped and counted in the log."""
    dataset, where = _read_corpus(spec)
    column = spec.get("column") or ("text" if Path(spec.get("file", "")).suffix == ".txt" else "caption")
    if column not in dataset.column_names:
        raise MacCapError(f"{where} has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    counts = {"seen": 0, "empty": 0}

    def clean(batch):
        values = [v for row in batch[column] for v in (row if isinstance(row, list) else [row])]
        kept = [v.strip() for v in values if isinstance(v, str) and v.strip()]
        counts["seen"] += len(values)
        counts["empty"] += len(values) - len(kept)
        if tokenizer is not None and kept:
            lengths = [len(ids) for ids in tokenizer(kept, add_special_tokens=False)["input_ids"]]
            kept = [caption for caption, length in zip(kept, lengths) if length <= max_tokens]
        return {"caption": kept}

    # Not from datasets' cache: `clean` must run to count what it drops.
    captions = dataset.map(clean, batched=True, remove_columns=dataset.column_names, load_from_cache_file=False,
                           desc="reading captions")
    long = counts["seen"] - counts["empty"] - len(captions)
    dropped = [f"{counts['empty']} empty or non-string dropped"] if counts["empty"] else []
    dropped += [f"{long} longer than {max_tokens} tokens dropped"] if long else []
    logger.warning(", ".join([f"{where}: {len(captions)} captions", *dropped]))
    if len(captions) == 0:
        raise MacCapError(f"{where}: no usable caption in column {column!r}")
    return captions


def split_corpus(hub_config, tokenizer=None):
    """(train, eval) caption datasets of a hub config's corpus; eval is None without a held-out part. With the LM
    `tokenizer`, captions longer than the hub config's `max_caption_length` tokens are dropped."""
    spec = hub_config.corpus
    file = hub_config.corpus_file()
    limit = {"tokenizer": tokenizer, "max_tokens": hub_config.max_caption_length}
    train = load_captions({**spec, "file": str(file)} if file else spec, **limit)
    evaluation = None
    if spec.get("validation_split"):
        evaluation = load_captions({**spec, "split": spec["validation_split"]}, **limit)
    elif spec.get("validation_fraction"):
        seed = hub_config.training_arguments.get("seed", 42)
        parts = train.train_test_split(test_size=spec["validation_fraction"], seed=seed)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


# ------------------------------------------------------------------------------------------ CLIP feature cache
def corpus_fingerprint(captions):
    """A digest of the caption strings themselves, so the same corpus hits the cache whatever file it came from."""
    digest = hashlib.blake2b(digest_size=16)
    for batch in captions.iter(batch_size=10_000):
        for caption in batch["caption"]:
            data = caption.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def clip_text_fingerprint(model, processor):
    """A digest of everything a caption's CLIP text embedding depends on: the CLIP tokenizer, the CLIP context
    length and the text tower's weights (names, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    tokenizer = processor.clip_tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The last call's padding and truncation settings live in the backend too: they do not change a feature.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        state = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps(state, sort_keys=True).encode("utf-8"))
    digest.update(str(processor.clip_context_length).encode())
    tower = {**{f"text_model.{k}": v for k, v in model.clip.text_model.state_dict().items()},
             **{f"text_projection.{k}": v for k, v in model.clip.text_projection.state_dict().items()}}
    for name in sorted(tower):
        tensor = tower[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_text_features(captions, model, processor, cache_dir, batch_size=256):
    """`captions` plus a column of their L2-normalised CLIP text embeddings (float32), computed once per (corpus,
    CLIP text tower) and kept by datasets as an Arrow file in `cache_dir`: a rerun, or another run on the same
    corpus and CLIP, reads the file and never runs the text tower. Noise is not part of it: it is drawn per step."""
    fingerprint = hashlib.blake2b(
        f"{corpus_fingerprint(captions)}:{clip_text_fingerprint(model, processor)}".encode(), digest_size=16).hexdigest()
    cache_file = Path(cache_dir) / f"clip-text-features-{fingerprint}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)

    def embed(batch):
        with torch.no_grad():
            features = model.embed_texts(batch["caption"], processor)
        return {FEATURE_COLUMN: features.cpu().numpy()}

    training = model.clip.training
    model.clip.eval()
    try:
        # datasets writes to a temporary file and renames it when done: a killed run leaves no half cache.
        features = captions.map(embed, batched=True, batch_size=batch_size, cache_file_name=str(cache_file),
                                new_fingerprint=fingerprint, load_from_cache_file=True, desc="CLIP text features")
    finally:
        model.clip.train(training)
    return features.with_format("torch", columns=[FEATURE_COLUMN], output_all_columns=True)


class CaptionCollator:
    """Caption rows -> a text-only training batch through the processor: LM tokens and labels, and either the
    cached CLIP text embeddings of the rows or CLIP tokens for the model to encode."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        captions = [row["caption"] for row in rows]
        if FEATURE_COLUMN not in rows[0]:
            return dict(self.processor(text=captions))
        return {**self.processor.caption_lm_inputs(captions),
                FEATURE_COLUMN: torch.stack([torch.as_tensor(row[FEATURE_COLUMN]) for row in rows])}


# ------------------------------------------------------------------------------------------------- training
def token_accuracy_counts(logits, labels):
    """(correct, scored) next-token predictions: position t's argmax against label t+1, where it is scored."""
    labels = labels[:, 1:].to(logits.device)
    scored = labels != -100
    correct = (logits[:, :-1].argmax(-1) == labels) & scored
    return torch.stack([correct.sum(), scored.sum()]).double()


class MacCapTrainer(Trainer):
    """The Trainer, logging the token accuracy (`token_accuracy`, `eval_token_accuracy`) beside each loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token_counts = {}  # "loss" (training) / "eval_loss" -> (correct, scored) since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        key = "loss" if model.training else "eval_loss"
        counts = token_accuracy_counts(outputs.logits.detach(), inputs["labels"])
        self._token_counts[key] = self._token_counts.get(key, 0) + counts
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        for key in ("loss", "eval_loss"):
            if key in logs and key in self._token_counts:
                # Every process logs at the same step, so the counts can be summed across them here.
                correct, scored = self.accelerator.reduce(self._token_counts.pop(key), reduction="sum").tolist()
                logs[key.replace("loss", "token_accuracy")] = correct / max(scored, 1)
        super().log(logs, start_time)


def _precision(name):
    if name == "auto":
        if not torch.cuda.is_available():
            return {}
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    return {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[name]


def default_cache_dir():
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "maccap_text_features"


def prepare_run(hub_config, output_dir, resume, push_to_hub, max_steps):
    """What every recipe checks and sets before training: the output folder's last checkpoint (required with
    `resume`, refused without it), a Hub token before a run that will be pushed, and the hub config's
    TrainingArguments values with `max_steps` and the multi-process CPU defaults. -> (output_dir, checkpoint,
    arguments)."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume and checkpoint is None:
        raise MacCapError(f"--resume: {output_dir} holds no checkpoint-N folder to resume from")
    if not resume and checkpoint is not None:
        raise MacCapError(f"{output_dir} already holds {Path(checkpoint).name}: pass --resume to continue that "
                          "run, or choose another --output-dir")
    if push_to_hub:
        from huggingface_hub import get_token

        if get_token() is None:  # before the run, not after hours of it
            raise MacCapError(f"--push-to-hub {push_to_hub}: no Hugging Face token; set HF_TOKEN or run "
                              "`hf auth login`")
    arguments = dict(hub_config.training_arguments)
    if max_steps is not None:
        arguments["max_steps"] = max_steps
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        arguments.setdefault("use_cpu", True)  # several CPU processes: only then does accelerate pick gloo DDP
    arguments.setdefault("ddp_find_unused_parameters", False)  # every trainable parameter is used at every step
    return output_dir, checkpoint, arguments


def model_from_components(hub_config, clip, lm, finetune_lm):
    """A fresh MacCap (new projector) on the CLIP and LM checkpoints, with the hub config's method settings."""
    from ..modeling_maccap import MacCapForConditionalGeneration

    try:
        return MacCapForConditionalGeneration.from_pretrained_components(
            clip=clip, lm=lm, freeze_lm=not finetune_lm, **hub_config.maccap)
    except OSError as error:
        raise MacCapError(f"{hub_config.path}: architecture.components: cannot load CLIP {clip!r} and LM {lm!r} "
                          f"(--clip / --lm take local copies): {str(error).splitlines()[0]}") from None


def train(hub_config, output_dir, *, clip=None, lm=None, max_steps=None, precision="auto", finetune_lm=None,
          resume=False, feature_cache=True, cache_dir=None, push_to_hub=None, callbacks=None):
    """Train the variant described by `hub_config` (a `HubConfig` or the path of one) and save it to `output_dir`.

    `clip` / `lm` replace the hub config's component checkpoints (e.g. local copies), `max_steps` its epoch
    count, `finetune_lm` its `finetune_lm` (use `dataclasses.replace(hub_config, corpus=...)` for another
    corpus). `precision` is "auto" (bf16 or fp16 on a GPU, fp32 on CPU), "fp32", "bf16" or "fp16".
    `resume` continues from the last `checkpoint-N` in `output_dir`; without it, a folder that holds checkpoints
    is refused. `feature_cache=False` runs the CLIP text tower at every step instead of once per corpus
    (`cache_dir`, default under datasets' cache). `push_to_hub="org/name"` stages and pushes the result as
    `maccap upload` does. `callbacks` are extra `TrainerCallback`s. Under torchrun every process returns once the
    folder is saved, and the run's process group is destroyed. Returns the output folder."""
    from transformers import TrainingArguments

    if not hasattr(hub_config, "training_arguments"):
        hub_config = load_hub_config(hub_config)
    if hub_config.recipe.get("name", "text") != "text":  # the hub config names a recipe that sees images
        from .recipes import recipe_from_dict, train_recipe

        recipe = recipe_from_dict(hub_config.recipe, relative_to=hub_config.path.parent)
        return train_recipe(hub_config, output_dir, recipe, clip=clip, lm=lm, max_steps=max_steps,
                            precision=precision, finetune_lm=finetune_lm, resume=resume, feature_cache=feature_cache,
                            cache_dir=cache_dir, push_to_hub=push_to_hub, callbacks=callbacks)
    output_dir, checkpoint, arguments = prepare_run(hub_config, output_dir, resume, push_to_hub, max_steps)
    # Built first: under torchrun / accelerate launch this sets up the process group the rest relies on.
    args = TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, label_names=["labels"],
                             **_precision(precision), **arguments)

    clip, lm = clip or hub_config.clip, lm or hub_config.lm
    finetune_lm = hub_config.finetune_lm if finetune_lm is None else finetune_lm
    set_seed(args.seed)  # the projector's initialisation too, not only the run, follows the seed
    model = model_from_components(hub_config, clip, lm, finetune_lm)
    processor = model.processor
    processor.max_caption_length = hub_config.max_caption_length
    with args.main_process_first(desc="reading captions"):
        train_set, eval_set = split_corpus(hub_config, tokenizer=processor.tokenizer)
    if arguments.get("eval_strategy", "no") != "no" and eval_set is None:
        raise MacCapError(f"{hub_config.path}: training.arguments.eval_strategy is {arguments['eval_strategy']!r} "
                          "but the corpus has no held-out part: set corpus.validation_split or validation_fraction")
    if feature_cache:
        model.clip.to(args.device)
        with args.main_process_first(desc="CLIP text features"):  # one process computes, the others read the file
            cache_dir = cache_dir or default_cache_dir()
            train_set = cache_text_features(train_set, model, processor, cache_dir)
            if eval_set is not None:
                eval_set = cache_text_features(eval_set, model, processor, cache_dir)

    trainer = MacCapTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            data_collator=CaptionCollator(processor), processing_class=processor, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=checkpoint if resume else None)
    return save_run(trainer, output_dir, hub_config=hub_config, push_to_hub=push_to_hub)


def save_run(trainer, output_dir, *, files=None, hub_config=None, push_to_hub=None):
    """Save a finished run to `output_dir`: the model (weights, config, remote code, the processor) and, on the main
    process, its state and arguments as JSON (no pickle), `files` ({name: text}), then with `push_to_hub` the
    staged folder pushed as `maccap upload` does. Then the run ends: every process waits until the folder is
    complete, and under torchrun the process group the run's TrainingArguments set up is destroyed (a process that
    exits with it still up can abort in its teardown). Returns the output folder."""
    output_dir = Path(output_dir)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        # The Trainer pickles its arguments; keep them as JSON instead, so the folder holds no pickle at all.
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        (output_dir / "training_args.json").write_text(trainer.args.to_json_string(), encoding="utf-8")
        for name, text in (files or {}).items():
            (output_dir / name).write_text(text, encoding="utf-8")
        if push_to_hub:
            from .hub import push, stage

            staging_dir = output_dir.parent / f"{output_dir.name}-hub-staging"
            stage(output_dir, hub_config, staging_dir, repo_id=push_to_hub)
            url = push(staging_dir, push_to_hub, exist_ok=True)
            logger.warning(f"pushed {output_dir} to {push_to_hub}: {url}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return output_dir


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(commands):
    fit = commands.add_parser("train", help="train a variant's projector on captions alone, or with images (--recipe)")
    fit.add_argument("--hub-config", required=True, help="hub_configs/*.json: components, method, corpus, arguments")
    fit.add_argument("--output-dir", help="where the trained model goes (default: checkpoints/<repo name>)")
    fit.add_argument("--clip", help="CLIP checkpoint instead of the hub config's (Hub id or local folder)")
    fit.add_argument("--lm", help="causal LM checkpoint instead of the hub config's (Hub id or local folder)")
    fit.add_argument("--captions", help="corpus instead of the hub config's: a caption file (.json list, .jsonl, "
                                        ".csv, .parquet, .txt) or a Hub dataset id")
    fit.add_argument("--caption-column", help="column of --captions holding the captions")
    fit.add_argument("--caption-split", default="train", help="split of a Hub dataset --captions (default: %(default)s)")
    fit.add_argument("--validation-fraction", type=float, help="fraction of --captions held out for the eval loss")
    fit.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    fit.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="override a TrainingArguments value of the hub config, e.g. gradient_accumulation_steps=4 "
                          "(repeatable; VALUE is read as JSON)")
    fit.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                     help="mixed precision; auto = bf16 (or fp16) on a GPU, fp32 on CPU (default: %(default)s)")
    fit.add_argument("--finetune-lm", action="store_true", help="also train the LM (default: the hub config's "
                                                                 "finetune_lm; the projector alone)")
    fit.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N in --output-dir")
    fit.add_argument("--no-feature-cache", action="store_true",
                     help="run the CLIP text tower at every step instead of caching the corpus's features once")
    fit.add_argument("--feature-cache-dir", help="where cached CLIP text features live (default: under datasets' "
                                                 "cache, HF_DATASETS_CACHE/maccap_text_features)")
    fit.add_argument("--push-to-hub", metavar="ORG/NAME", help="when done, stage the model (card included) and push "
                                                               "it as `maccap upload` does")
    from .recipes import add_arguments

    add_arguments(fit)  # --recipe, --pairs, --images, --init-from, --recipe-set
    fit.set_defaults(run=run)
    return fit


def _argument_overrides(settings):
    """`--set NAME=VALUE` pairs (VALUE read as JSON, else as a string) -> TrainingArguments overrides."""
    overrides = {}
    for setting in settings:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise MacCapError(f"--set {setting!r}: expected NAME=VALUE, e.g. gradient_accumulation_steps=4")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


def run(args):
    hub_config = load_hub_config(args.hub_config)
    if args.captions:  # another corpus in place of the hub config's: a file, or else a Hub dataset id
        path = Path(args.captions)
        corpus = {"file": str(path.resolve())} if path.exists() or path.suffix else {
            "hub_id": args.captions, "split": args.caption_split}
        corpus.update({k: v for k, v in (("column", args.caption_column),
                                          ("validation_fraction", args.validation_fraction)) if v is not None})
        hub_config = dataclasses.replace(hub_config, corpus=corpus)
    if args.set:
        arguments = {**hub_config.training_arguments, **_argument_overrides(args.set)}
        check_training_arguments("--set", arguments)
        hub_config = dataclasses.replace(hub_config, training_arguments=arguments)
    output_dir = args.output_dir or Path("checkpoints") / hub_config.repo_id.split("/")[-1]
    from . import recipes

    recipe = recipes.recipe_from_arguments(args, hub_config)
    if recipe is not None:  # supervised or clip-reward: the recipes that see images
        return recipes.run(args, hub_config, output_dir, recipe)
    hub_config = dataclasses.replace(hub_config, recipe={})  # text only, also where --recipe text overrides it
    train(hub_config, output_dir, clip=args.clip, lm=args.lm, max_steps=args.max_steps, precision=args.precision,
          finetune_lm=args.finetune_lm or None, resume=args.resume, feature_cache=not args.no_feature_cache,
          cache_dir=args.feature_cache_dir, push_to_hub=args.push_to_hub)
    print(f"trained {hub_config.model_name}: {output_dir}")
    return 0

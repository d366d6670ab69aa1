"""Text-only training of the MacCap projector with the transformers Trainer (not shipped as remote code).

`train(hub_config, output_dir)` loads the variant's components and caption corpus, trains, and writes a folder
that `AutoModel.from_pretrained(..., trust_remote_code=True)` and `pipeline("image-to-text")` load.
"""

import json
import logging
from pathlib import Path

import torch

from .hub_config import HubConfigError

logger = logging.getLogger(__name__)

CAPTION_BUILDERS = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class CaptionDataError(ValueError):
    """A caption corpus that cannot be read: the message names the file or dataset and what is wrong."""


def _read_corpus(spec):
    import datasets

    if "hub_id" in spec:
        where = f"Hub dataset {spec['hub_id']}" + (f" ({spec['config']})" if spec.get("config") else "")
        try:
            return datasets.load_dataset(spec["hub_id"], spec.get("config"), split=spec["split"]), where
        except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
            raise CaptionDataError(f"cannot load {where}, split {spec['split']!r}: {error}") from None
    file = Path(spec["file"])
    where = f"caption file {file}"
    if not file.is_file():
        raise CaptionDataError(f"{where} does not exist")
    try:
        if file.suffix == ".json":  # the reference format: a JSON list of caption strings (or of records)
            data = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise CaptionDataError(f"{where}: expected a JSON list, got {type(data).__name__}")
            if all(isinstance(row, dict) for row in data):
                return datasets.Dataset.from_list(data), where
            return datasets.Dataset.from_dict({"caption": [row if isinstance(row, str) else None for row in data]}), where
        if file.suffix not in CAPTION_BUILDERS:
            raise CaptionDataError(f"{where}: unknown format {file.suffix!r}; use .json, {', '.join(CAPTION_BUILDERS)}")
        return datasets.load_dataset(CAPTION_BUILDERS[file.suffix], data_files=str(file), split="train"), where
    except CaptionDataError:
        raise
    except Exception as error:  # noqa: BLE001 - json, arrow and datasets errors all mean "unreadable"
        raise CaptionDataError(f"cannot read {where}: {error}") from None


def load_captions(spec):
    """A `datasets.Dataset` with one string column "caption" from a dataset spec (a hub config's `dataset`).
    A column may hold one caption or a list of captions per row; empty, whitespace-only and non-string values
    are dropped and counted in the log."""
    dataset, where = _read_corpus(spec)
    column = spec.get("column") or ("text" if Path(spec.get("file", "")).suffix == ".txt" else "caption")
    if column not in dataset.column_names:
        raise CaptionDataError(f"{where} has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    seen = [0]

    def clean(batch):
        values = [v for row in batch[column] for v in (row if isinstance(row, list) else [row])]
        seen[0] += len(values)
        return {"caption": [v.strip() for v in values if isinstance(v, str) and v.strip()]}

    # Not from datasets' cache: `clean` must run to count what it drops.
    captions = dataset.map(clean, batched=True, remove_columns=dataset.column_names, load_from_cache_file=False,
                           desc="reading captions")
    dropped = seen[0] - len(captions)
    logger.warning(f"{where}: {len(captions)} captions" + (f", {dropped} empty or non-string dropped" if dropped else ""))
    if len(captions) == 0:
        raise CaptionDataError(f"{where}: no usable caption in column {column!r}")
    return captions


def split_corpus(hub_config):
    """(train, eval) caption datasets of a hub config's corpus; eval is None without a held-out part."""
    spec = hub_config.dataset
    file = hub_config.dataset_file()
    train = load_captions({**spec, "file": str(file)} if file else spec)
    evaluation = None
    if spec.get("validation_split"):
        evaluation = load_captions({**spec, "split": spec["validation_split"]})
    elif spec.get("validation_fraction"):
        seed = hub_config.training_arguments.get("seed", 42)
        parts = train.train_test_split(test_size=spec["validation_fraction"], seed=seed)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


class CaptionCollator:
    """Caption strings -> a text-only training batch (LM tokens and labels, CLIP tokens) through the processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        return dict(self.processor(text=[row["caption"] for row in rows]))


def _precision(name):
    if name == "auto":
        if not torch.cuda.is_available():
            return {}
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    return {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[name]


def train(hub_config, output_dir, *, clip=None, lm=None, max_steps=None, precision="auto"):
    """Train the variant described by `hub_config` (a `HubConfig`) and save it to `output_dir`.

    `clip` / `lm` replace the hub config's component checkpoints (e.g. local copies), `max_steps` its epoch
    count (use `dataclasses.replace(hub_config, dataset=...)` for another corpus); `precision` is "auto" (bf16 or fp16 on a GPU, fp32 on CPU), "fp32", "bf16" or
    "fp16". Returns the output folder."""
    from transformers import Trainer, TrainingArguments

    from .modeling_maccap import MacCapForConditionalGeneration

    output_dir = Path(output_dir)
    clip, lm = clip or hub_config.clip, lm or hub_config.lm
    try:
        model = MacCapForConditionalGeneration.from_pretrained_components(
            clip=clip, lm=lm, freeze_lm=not hub_config.finetune_lm, **hub_config.maccap)
    except OSError as error:
        raise HubConfigError(f"{hub_config.path}: components: cannot load CLIP {clip!r} and LM {lm!r} (--clip / --lm "
                             f"take local copies): {str(error).splitlines()[0]}") from None
    processor = model.processor
    processor.max_caption_length = hub_config.max_caption_length
    train_set, eval_set = split_corpus(hub_config)

    arguments = dict(hub_config.training_arguments)
    if max_steps is not None:
        arguments["max_steps"] = max_steps
    if arguments.get("eval_strategy", "no") != "no" and eval_set is None:
        raise HubConfigError(f"{hub_config.path}: training.arguments.eval_strategy is {arguments['eval_strategy']!r} "
                             "but the corpus has no held-out part: set dataset.validation_split or validation_fraction")
    args = TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, label_names=["labels"],
                             **_precision(precision), **arguments)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=CaptionCollator(processor), processing_class=processor)
    trainer.train()
    trainer.save_model(str(output_dir))  # weights, config, remote code, and the processor (processing_class)
    trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    # The Trainer pickles its arguments; keep them as JSON instead, so the folder holds no pickle at all.
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    (output_dir / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
    return output_dir

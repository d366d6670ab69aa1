"""`maccap synthesize`: (image, caption, CLIP score) pairs from a caption corpus and a diffusers text-to-image
pipeline, or from pairs the user already has (not shipped as remote code).

Output folder: images/NNNNNNNN.png, metadata.jsonl (one {"index", "file_name", "caption", "clip_score"} a line, an
image folder `datasets` reads), errors.jsonl (captions skipped, with the reason), and dataset/, the pairs as a
`datasets` image dataset (save_to_disk) that `maccap train-pcm` reads. Every caption's image comes from a
generator seeded by (--seed, its index), so a resumed run gives the images an uninterrupted one gives.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import MacCapError, listing

logger = logging.getLogger(__name__)

METADATA, ERRORS, IMAGES, DATASET = "metadata.jsonl", "errors.jsonl", "images", "dataset"


# --------------------------------------------------------------------------------------------------- checks
def image_defect(image):
    """Why a generated image cannot be a training image (None when it can): not finite (a NaN latent), or one
    flat colour (a failed decode, or a safety checker's black frame). `image`: float array in [0, 1], HxWxC."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        return f"not an image array (shape {array.shape})"
    if not np.isfinite(array).all():
        return "not finite (NaN or inf pixels)"
    if float(array.max() - array.min()) < 1e-3:
        return "one flat colour (a failed or blanked generation)"
    return None


def caption_defect(caption):
    if not isinstance(caption, str):
        return f"caption is not a string ({type(caption).__name__})"
    if not caption.strip():
        return "empty caption"
    return None


# ---------------------------------------------------------------------------------------------- CLIP scores
class ClipScorer:
    """cos(image, caption) with a CLIP checkpoint (the raw cosine; CLIPScore is 2.5 max(cos, 0))."""

    def __init__(self, clip, device="cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer

        from ..modeling_maccap import load_clip_model

        self.torch, self.device = torch, device
        try:
            self.model = load_clip_model(clip).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(clip)
            self.image_processor = AutoImageProcessor.from_pretrained(clip)
        except OSError as error:
            raise MacCapError(f"cannot load CLIP {clip!r} for the CLIP scores: {str(error).splitlines()[0]}") from None

    def __call__(self, images, captions):
        torch = self.torch
        with torch.no_grad():
            pixels = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            text = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(self.device)
            image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
            text_embeds = self.model.get_text_features(**text).pooler_output
            image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
            text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        return (image_embeds * text_embeds).sum(-1).cpu().tolist()


# ----------------------------------------------------------------------------------------------- the records
def _read_jsonl(path):
    """The records of a JSONL file; a torn last line (a killed run) is dropped and the file cut before it."""
    if not path.exists():
        return []
    records, good = [], 0
    with open(path, "rb") as file:
        for line in file:
            try:
                records.append(json.loads(line))
                good += len(line)
            except json.JSONDecodeError:
                break
    if good != path.stat().st_size:
        with open(path, "r+b") as file:
            file.truncate(good)
    return records


def _append(file, record):
    file.write(json.dumps(record) + "\n")
    file.flush()
    os.fsync(file.fileno())


def read_caption_corpus(path, column=None):
    """Every caption of a corpus file (as `maccap train --captions` reads them), empty ones included, in order."""
    from .training import _read_corpus

    path = Path(path)
    dataset, where = _read_corpus({"file": str(path)})
    column = column or ("text" if path.suffix == ".txt" else "caption")
    if column not in dataset.column_names:
        raise MacCapError(f"{where} has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    return [v for row in dataset[column] for v in (row if isinstance(row, list) else [row])]


# ------------------------------------------------------------------------------------------ text to image
def load_text_to_image(model_id, device="cpu", dtype=None):
    """A diffusers text-to-image pipeline (Hub id or folder); needs `pip install "maccap[synthesize]"`."""
    try:
        import diffusers
    except ImportError:
        raise MacCapError('maccap synthesize needs diffusers: pip install "maccap[synthesize]"') from None
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as error:
        raise MacCapError(f"cannot load the text-to-image pipeline {model_id!r}: {str(error).splitlines()[0]}") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def synthesize(captions, output_dir, pipeline, scorer, *, batch_size=4, seed=0, resume=False, **pipeline_kwargs):
    """Render `captions` (strings) with `pipeline` into `output_dir` (layout: the module's docstring), each
    scored by `scorer(images, captions)`. An empty caption, or a generated image with a defect (`image_defect`),
    goes to errors.jsonl with the reason and is skipped. `resume`: keep what a killed run wrote and do the rest
    (errors included: they are not retried); without it, a folder that holds records is refused.
    `pipeline_kwargs` go to every pipeline call (num_inference_steps, height, width, guidance_scale...).
    Returns {"pairs", "skipped", "dataset"}."""
    import torch
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    metadata_path, errors_path = output_dir / METADATA, output_dir / ERRORS
    if not resume and (_read_jsonl(metadata_path) or _read_jsonl(errors_path)):
        raise MacCapError(f"{output_dir} already holds pairs: pass --resume to continue, or choose another --out")
    (output_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    done = {r["index"] for r in _read_jsonl(metadata_path)} | {r["index"] for r in _read_jsonl(errors_path)}
    todo = [i for i in range(len(captions)) if i not in done]
    with open(metadata_path, "a", encoding="utf-8") as metadata, open(errors_path, "a", encoding="utf-8") as errors, \
            tqdm(total=len(captions), initial=len(captions) - len(todo), desc="synthesizing", unit="image") as bar:
        for start in range(0, len(todo), batch_size):
            batch = []
            for i in todo[start:start + batch_size]:
                reason = caption_defect(captions[i])
                if reason:
                    _append(errors, {"index": i, "caption": captions[i], "error": reason})
                    bar.update(1)
                else:
                    batch.append(i)
            if not batch:
                continue
            prompts = [captions[i].strip() for i in batch]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in batch]
            arrays = pipeline(prompt=prompts, generator=generators, output_type="np", **pipeline_kwargs).images
            kept = []
            for i, prompt, array in zip(batch, prompts, arrays):
                reason = image_defect(array)
                if reason:
                    _append(errors, {"index": i, "caption": prompt, "error": f"generated image {reason}"})
                    bar.update(1)
                    continue
                image = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8).squeeze())
                name = f"{IMAGES}/{i:08d}.png"
                image.save(output_dir / name)
                kept.append((i, prompt, name, image))
            if kept:
                scores = scorer([k[3] for k in kept], [k[1] for k in kept])
                for (i, prompt, name, _), score in zip(kept, scores):
                    _append(metadata, {"index": i, "file_name": name, "caption": prompt, "clip_score": float(score)})
                    bar.update(1)
    return _finish(output_dir)


def _finish(output_dir):
    """Write dataset/ from metadata.jsonl, in caption order, and report what was skipped."""
    import datasets

    records = sorted(_read_jsonl(output_dir / METADATA), key=lambda r: r["index"])
    skipped = _read_jsonl(output_dir / ERRORS)
    if skipped:
        reasons = sorted({r["error"] for r in skipped})
        logger.warning(f"{len(skipped)} captions skipped ({output_dir / ERRORS}): {listing(reasons, 5)}")
    data = {"image": [str(output_dir / r["file_name"]) for r in records], "caption": [r["caption"] for r in records],
            "clip_score": [r["clip_score"] for r in records], "index": [r["index"] for r in records]}
    dataset = datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())
    # Embedded in the Arrow files, so dataset/ stands alone (the images/ folder is for people and for --resume).
    dataset.save_to_disk(str(output_dir / DATASET))
    return {"pairs": len(records), "skipped": len(skipped), "dataset": str(output_dir / DATASET)}


# ----------------------------------------------------------------------------------------- existing pairs
def _load_pairs_source(source, split):
    import datasets

    path = Path(source)
    try:
        if (path / DATASET).is_dir():
            dataset = datasets.load_from_disk(str(path / DATASET))
        elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            dataset = datasets.load_from_disk(str(path))
        elif path.is_dir():
            dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        else:
            dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
        raise MacCapError(f"cannot read pairs {source}: {str(error).splitlines()[0]}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise MacCapError(f"pairs {source} have no split {split!r} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    return dataset


def read_pairs(source, image_column="image", caption_column="caption", split="train"):
    """(image, caption) pairs from a `maccap synthesize` folder, a save_to_disk folder, an image folder with a
    metadata file, or a Hub dataset: a Dataset with columns "image" (decoded by datasets) and "caption" (and
    "clip_score" where the source has one). A row with an empty caption or an unreadable image is logged with its
    reason and skipped."""
    import datasets

    dataset = _load_pairs_source(source, split)
    missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
    if missing:
        raise MacCapError(f"pairs {source} have no column {listing(missing)} (columns: "
                          f"{', '.join(dataset.column_names)}): pass --image-column / --caption-column")
    keep = [c for c in (image_column, caption_column, "clip_score") if c in dataset.column_names]
    dataset = dataset.select_columns(keep).cast_column(image_column, datasets.Image(decode=False))
    bad = {}
    for i, row in enumerate(dataset):
        reason = caption_defect(row[caption_column]) or _unreadable(row[image_column])
        if reason:
            bad[i] = reason
    if bad:
        logger.warning(f"pairs {source}: {len(bad)} of {len(dataset)} rows skipped: " + listing(
            [f"row {i}: {reason}" for i, reason in bad.items()], 10))
        dataset = dataset.select([i for i in range(len(dataset)) if i not in bad])
    if len(dataset) == 0:
        raise MacCapError(f"pairs {source}: no usable (image, caption) row")
    dataset = dataset.rename_columns({k: v for k, v in ((image_column, "image"), (caption_column, "caption"))
                                      if k != v})
    return dataset.cast_column("image", datasets.Image())


def _unreadable(value):
    import io

    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(source) as image:
            image.load()
            if min(image.size) < 1:
                return "image has no pixels"
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a bad file
        return f"unreadable image ({type(error).__name__}: {error})"
    return None


def score_pairs(pairs, output_dir, scorer, batch_size=32):
    """Existing pairs (`read_pairs`) written in `synthesize`'s layout, with their CLIP scores."""
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    if _read_jsonl(output_dir / METADATA):
        raise MacCapError(f"{output_dir} already holds pairs: choose another --out")
    (output_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    with open(output_dir / METADATA, "a", encoding="utf-8") as metadata:
        for start in tqdm(range(0, len(pairs), batch_size), desc="CLIP scores", unit="batch"):
            rows = pairs[start:start + batch_size]
            images = [image.convert("RGB") for image in rows["image"]]
            for offset, (image, caption, score) in enumerate(zip(images, rows["caption"],
                                                                   scorer(images, rows["caption"]))):
                name = f"{IMAGES}/{start + offset:08d}.png"
                image.save(output_dir / name)
                _append(metadata, {"index": start + offset, "file_name": name, "caption": caption.strip(),
                                   "clip_score": float(score)})
    return _finish(output_dir)


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(commands):
    make = commands.add_parser("synthesize", help="render a caption corpus into (image, caption, CLIP score) pairs "
                                                  "with a diffusers text-to-image model, or score existing pairs")
    make.add_argument("captions", nargs="?", help="caption file (.json list, .jsonl, .csv, .parquet, .txt)")
    make.add_argument("--out", required=True, help="output folder (images/, metadata.jsonl, errors.jsonl, dataset/)")
    make.add_argument("--clip", required=True, help="CLIP checkpoint for the CLIP scores (Hub id or folder)")
    make.add_argument("--model-id", default="stabilityai/sd-turbo",
                      help="diffusers text-to-image pipeline, Hub id or folder (default: %(default)s)")
    make.add_argument("--from-pairs", metavar="DATASET",
                      help="instead of rendering: pairs you have (save_to_disk folder, image folder, Hub dataset)")
    make.add_argument("--image-column", default="image", help="image column of --from-pairs")
    make.add_argument("--caption-column", help="caption column (default: caption, or text for .txt)")
    make.add_argument("--split", default="train", help="split of a Hub dataset --from-pairs (default: %(default)s)")
    make.add_argument("--batch-size", type=int, default=4)
    make.add_argument("--steps", type=int, default=1, help="denoising steps (default: %(default)s, sd-turbo's)")
    make.add_argument("--guidance-scale", type=float, default=0.0, help="(default: %(default)s, sd-turbo's)")
    make.add_argument("--size", type=int, help="image height and width (default: the pipeline's)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--limit", type=int, help="the first N captions only")
    make.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    make.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    make.set_defaults(run=run)
    return make


def run(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = ClipScorer(args.clip, device)
    if args.from_pairs:
        pairs = read_pairs(args.from_pairs, args.image_column, args.caption_column or "caption", args.split)
        result = score_pairs(pairs, args.out, scorer, args.batch_size)
    else:
        if not args.captions:
            raise MacCapError("give a caption file, or --from-pairs DATASET")
        captions = read_caption_corpus(args.captions, args.caption_column)[:args.limit]
        pipeline = load_text_to_image(args.model_id, device, torch.float16 if device == "cuda" else None)
        kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
        if args.size:
            kwargs.update(height=args.size, width=args.size)
        result = synthesize(captions, args.out, pipeline, scorer, batch_size=args.batch_size, seed=args.seed,
                            resume=args.resume, **kwargs)
    print(f"{result['pairs']} pairs ({result['skipped']} skipped, see {Path(args.out) / ERRORS}): {result['dataset']}")
    return 0

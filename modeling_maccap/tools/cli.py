"""The `maccap` command line."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..demo import demo
from . import captioning, evaluation, vqa

# `maccap caption`, `maccap eval`, `maccap vqa`, `maccap demo`: each module adds its subcommand and errors.
SUBCOMMAND_MODULES = (captioning, evaluation, vqa, demo)

# What a fresh interpreter runs on the saved folder: the installed package is hidden, so only the folder's
# remote code can answer.
_FRESH_PIPELINE = """
import json, sys
sys.modules["modeling_maccap"] = None
from transformers import pipeline
pipe = pipeline("image-to-text", model=sys.argv[1], trust_remote_code=True)
print(json.dumps([out[0]["generated_text"] for out in pipe(sys.argv[2:], batch_size=2)]))
"""


def selfcheck(out_dir):
    """Offline check of the whole packaging loop with tiny random weights: assemble from component folders,
    caption, save with remote code, reload through pipeline("image-to-text") in a fresh process, compare."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from PIL import Image

    from .. import MacCapForConditionalGeneration
    from .tiny import TINY_MACCAP, build_tiny_components

    out_dir = Path(out_dir).resolve()
    clip_dir, lm_dir = build_tiny_components(out_dir / "components")
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=clip_dir, lm=lm_dir, **TINY_MACCAP).eval()
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i, size in enumerate([(64, 48), (40, 80), (32, 32)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        paths.append(str(out_dir / f"image{i}.png"))
        Image.fromarray(pixels.numpy()).save(paths[-1])
    processor = model.processor
    captions = processor.batch_decode(model.generate(**processor(images=paths)))

    folder = out_dir / "maccap-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with tempfile.TemporaryDirectory() as cwd:
        run = subprocess.run([sys.executable, "-c", _FRESH_PIPELINE, str(folder), *paths], capture_output=True,
                             text=True, cwd=cwd, stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        print("FAILED: the saved folder did not load as remote code", file=sys.stderr)
        return 1
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"tiny random MacCap saved to {folder} (random weights: the captions are noise, not language)")
    for path, mine, theirs in zip(paths, captions, reloaded):
        print(f"  {Path(path).name}: in-process {mine!r} | fresh-process pipeline {theirs!r}")
    if reloaded != captions:
        print("FAILED: the reloaded pipeline captions differ from the source model's", file=sys.stderr)
        return 1
    print("OK: assemble -> caption -> save -> pipeline('image-to-text', trust_remote_code=True) in a fresh process")
    return 0


def _argument_overrides(settings):
    """`--set NAME=VALUE` pairs (VALUE read as JSON, else as a string) -> TrainingArguments overrides."""
    from .hub_config import HubConfigError

    overrides = {}
    for setting in settings:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise HubConfigError(f"--set {setting!r}: expected NAME=VALUE, e.g. gradient_accumulation_steps=4")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


def run_train(args):
    from .hub_config import check_training_arguments, load_hub_config
    from .training import train

    hub_config = load_hub_config(args.hub_config)
    if args.captions:  # another corpus in place of the hub config's: a file, or else a Hub dataset id
        path = Path(args.captions)
        dataset = {"file": str(path.resolve())} if path.exists() or path.suffix else {
            "hub_id": args.captions, "split": args.caption_split}
        dataset.update({k: v for k, v in (("column", args.caption_column),
                                           ("validation_fraction", args.validation_fraction)) if v is not None})
        hub_config = dataclasses.replace(hub_config, dataset=dataset)
    if args.set:
        arguments = {**hub_config.training_arguments, **_argument_overrides(args.set)}
        check_training_arguments("--set", arguments)
        hub_config = dataclasses.replace(hub_config, training_arguments=arguments)
    output_dir = args.output_dir or Path("checkpoints") / hub_config.repo_id.split("/")[-1]
    train(hub_config, output_dir, clip=args.clip, lm=args.lm, max_steps=args.max_steps, precision=args.precision,
          finetune_lm=args.finetune_lm or None, resume=args.resume, feature_cache=not args.no_feature_cache,
          cache_dir=args.feature_cache_dir, push_to_hub=args.push_to_hub)
    print(f"trained {hub_config.model_name}: {output_dir}")
    return 0


def run_upload(args):
    from .hub import push, stage
    from .hub_config import load_hub_config

    hub_config = load_hub_config(args.hub_config)
    repo_id = args.repo_id or hub_config.repo_id
    checkpoint = Path(args.checkpoint)
    staging_dir = Path(args.staging_dir or checkpoint.parent / f"{checkpoint.name}-hub-staging")
    stage(checkpoint, hub_config, staging_dir, repo_id=repo_id, eval_results=args.eval_results,
          max_shard_size=args.max_shard_size)
    print(f"staged {repo_id} in {staging_dir}")
    if args.dry_run:
        return 0
    url = push(staging_dir, repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message, exist_ok=args.exist_ok)
    print(f"pushed {staging_dir} to {repo_id}: {url}")
    return 0


def run_convert_original(args):
    from .convert_original import convert

    convert(args.checkpoint, lm=args.lm, out=args.out, clip=args.clip)
    print(f"converted {args.checkpoint} -> {args.out}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="maccap", description="MacCap zero-shot captioning")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("selfcheck", help="offline end-to-end check of the package with tiny random weights")
    check.add_argument("--out", default="maccap-selfcheck", help="folder for the tiny checkpoints (default: %(default)s)")

    fit = commands.add_parser("train", help="train a variant's projector on captions alone")
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

    up = commands.add_parser("upload", help="stage a trained checkpoint as a Hub repo (model card included) and push it")
    up.add_argument("checkpoint", help="the trained model folder (safetensors weights and processor files)")
    up.add_argument("--hub-config", required=True, help="the hub_configs/*.json the checkpoint was trained with")
    up.add_argument("--repo-id", help="ORG/NAME (default: the hub config's repo_id)")
    up.add_argument("--eval-results", help="evaluation results JSON to put into the card's model-index")
    up.add_argument("--staging-dir", help="where the repo folder is staged (default: CHECKPOINT-hub-staging)")
    up.add_argument("--max-shard-size", default="2GB", help="weights are sharded above this (default: %(default)s)")
    up.add_argument("--dry-run", action="store_true", help="stage only; push nothing")
    up.add_argument("--private", action="store_true", help="create the repo private")
    up.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    up.add_argument("--commit-message", help="commit message (default: 'Upload MacCap checkpoint')")
    up.add_argument("--exist-ok", action="store_true", help="add a commit to a repo that already exists")

    conv = commands.add_parser("convert-original", help="convert a checkpoint of the reference MacCap code")
    conv.add_argument("checkpoint", help="checkpoint_last.pth written by the reference code (read weights-only)")
    conv.add_argument("--lm", required=True, help="the LM it was trained with (Hub id or folder)")
    conv.add_argument("--out", required=True, help="folder for the converted MacCap")
    conv.add_argument("--clip", help="CLIP for checkpoints saved without clip_model.* weights (Hub id, folder or "
                                     "open_clip:ARCH/TAG)")
    for module in SUBCOMMAND_MODULES:  # each adds its subcommand, with set_defaults(run=...)
        module.add_parser(commands)
    return parser


def main(argv=None):
    from .convert_original import ConversionError
    from .hub import UploadError
    from .hub_config import HubConfigError
    from .training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "selfcheck":
            return selfcheck(args.out)
        if hasattr(args, "run"):
            return args.run(args)
        commands = {"train": run_train, "upload": run_upload, "convert-original": run_convert_original}
        return commands[args.command](args)
    except (HubConfigError, UploadError, TrainingError, ConversionError,
            *(error for module in SUBCOMMAND_MODULES for error in module.ERRORS)) as error:
        print(f"maccap {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`maccap selfcheck`: the packaging loop end to end, offline, with tiny random weights."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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


def add_parser(commands):
    check = commands.add_parser("selfcheck", help="offline end-to-end check of the package with tiny random weights")
    check.add_argument("--out", default="maccap-selfcheck", help="folder for the tiny checkpoints (default: %(default)s)")
    check.set_defaults(run=lambda args: selfcheck(args.out))

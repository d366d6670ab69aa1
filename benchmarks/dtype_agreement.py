"""What an opt-in weights dtype costs in captions, measured on a trained MacCap model.

The demo's text-only model (`maccap demo` must have run: its work folder holds the model) captions the demo's
held-out images with `generate()`'s defaults (the paper's settings: 4 noisy candidates, beam search, CLIP reranking)
twice, with the weights in float32 and in `--dtype` (`from_pretrained(..., dtype=...)`), the same noise seeds. A
random LM cannot answer this: its logits are nearly flat, so any rounding changes its beams.

    python benchmarks/dtype_agreement.py [--demo-dir maccap-demo] [--dtype bfloat16] [--threads T]

Reports the share of images whose kept caption is the same text in both dtypes and the share of candidates that are,
each with a 95% bootstrap interval over images; CIDEr of both against the references (pycocoevalcap) and their
paired difference with its interval; the time of each. Writes `--out` (JSON) and its section of BENCHMARKS.md.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from modeling_maccap import MacCapForConditionalGeneration  # noqa: E402
from modeling_maccap.demo import report  # noqa: E402
from modeling_maccap.demo.demo import DemoSettings, world_part  # noqa: E402
from modeling_maccap.tools.evaluation import caption_scores, find_java  # noqa: E402

from components import publish, run_facts  # noqa: E402

MODEL = Path("work") / "maccap-noise"  # the demo's text-only model with the paper's training noise


def held_out(demo_dir):
    """The demo's settings (from its results.json), its held-out scenes and their rendered images."""
    results = demo_dir / "results.json"
    if not results.is_file() or not (demo_dir / MODEL / "config.json").is_file():
        sys.exit(f"dtype_agreement: {demo_dir} holds no finished demo run (results.json and {MODEL}); "
                 f"run `maccap demo --output-dir {demo_dir}` first")
    settings = DemoSettings(**json.loads(results.read_text(encoding="utf-8"))["settings"])
    return (settings, *world_part(settings, "test"))


def caption(folder, dtype, images, seed, batch_size=100):
    """Kept captions and every candidate's text in `dtype`, the seconds generate() took, and the model's
    (num_candidates, num_beams) that generate() used."""
    model = MacCapForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    pixel_values = model.processor(images=images)["pixel_values"]
    kept, candidates, seconds = [], [], 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            t = time.perf_counter()
            out = model.generate(pixel_values=pixel_values[start:start + batch_size], noise_seed=seed,
                                 output_candidates=True)
            seconds += time.perf_counter() - t
            kept += model.processor.batch_decode(out.sequences)
            candidates += [model.processor.batch_decode(rows) for rows in out.candidates]
    return kept, candidates, seconds, (model.config.num_candidates, model.generation_config.num_beams)


def markdown(r):
    f, boot = r["figures"], r["bootstrap"]
    pct = lambda e: f"{100 * e['value']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"  # noqa: E731
    num = lambda e: f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"  # noqa: E731
    d = r["dtype"]
    low, high = f["cider_difference"]["low"], f["cider_difference"]["high"]
    return "\n".join([
        f"## Captions in {d} against float32, on a trained model",
        "",
        f"The demo's text-only MacCap (`{MODEL}` of a `maccap demo` run, seed {r['seed']}) captions its "
        f"{f['images']} held-out images with `generate()`'s defaults ({f['num_candidates']} noisy candidates, "
        f"{f['num_beams']} beams, CLIP reranking), the weights loaded in float32 and in {d} "
        f"(`from_pretrained(..., dtype=torch.{d})`), the same noise seeds. {r['machine']}, {r['threads']} threads, "
        f"{r['date'][:10]}, torch {r['torch']}, transformers {r['transformers']}. Intervals: 95% bootstrap over "
        f"images ({boot} resamples). CIDEr on pycocoevalcap's 0-1 scale.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| kept caption the same text as float32's | {pct(f['same_kept'])} |",
        f"| candidates the same text as float32's | {pct(f['same_candidates'])} |",
        f"| CIDEr, float32 | {num(f['cider']['float32'])} |",
        f"| CIDEr, {d} | {num(f['cider'][d])} |",
        f"| CIDEr, {d} - float32 | {num(f['cider_difference'])} |",
        f"| distinct kept captions, float32 / {d} | {f['distinct']['float32']} / {f['distinct'][d]} |",
        f"| generate() seconds, float32 / {d} | {f['seconds']['float32']:.1f} / {f['seconds'][d]:.1f} |",
        "",
        f"- {d} changes {100 * (1 - f['same_kept']['value']):.0f}% of the kept captions. Its CIDEr is "
        + ("no different from float32's that these images can tell" if low <= 0 <= high else
           f"{'higher' if low > 0 else 'lower'} than float32's in this run")
        + f" ({num(f['cider_difference'])}). So {d} is opt-in: the captions of the Python API stay float32's.",
        "- These are the demo's tiny components (its CLIP and LM are trained here). A full-size CLIP and GPT-2 can "
        "agree more or less: no such weights can be downloaded on this machine, so that is not measured.",
        "",
        f"Command: `{r['command']}`",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("maccap-demo"), help="a finished `maccap demo` run")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dtype_agreement.json")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="'' to leave it alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    settings, test, images = held_out(args.demo_dir)
    folder = args.demo_dir / MODEL
    runs = {d: caption(folder, d, images, settings.seed) for d in ("float32", args.dtype)}
    (kept32, cand32, _, (num_candidates, num_beams)), (kept, cand, _, _) = runs["float32"], runs[args.dtype]
    boot = dict(samples=args.bootstrap_samples, seed=settings.seed)
    same_kept = np.array([a == b for a, b in zip(kept32, kept)], dtype=float)
    same_candidates = np.array([np.mean([a == b for a, b in zip(x, y)]) for x, y in zip(cand32, cand)])
    references = {str(i): captions for i, (_, captions) in enumerate(test)}
    java = find_java()
    per_image = {d: np.asarray(caption_scores(references, {str(i): c for i, c in enumerate(runs[d][0])}, java)
                               ["CIDEr_per_image"]) for d in runs}
    figures = {
        "images": len(images), "num_candidates": num_candidates, "num_beams": num_beams,
        "same_kept": report.interval(report.mean, same_kept, **boot),
        "same_candidates": report.interval(report.mean, same_candidates, **boot),
        "cider": {d: report.interval(report.mean, per_image[d], **boot) for d in runs},
        "cider_difference": report.interval(report.difference, per_image[args.dtype], per_image["float32"], **boot),
        "distinct": {d: len(set(runs[d][0])) for d in runs},
        "seconds": {d: runs[d][2] for d in runs},
        "differing_examples": [{"float32": a, args.dtype: b} for a, b in zip(kept32, kept) if a != b][:5],
    }
    result = {**run_facts("dtype_agreement"), "dtype": args.dtype, "seed": settings.seed,
              "bootstrap": args.bootstrap_samples, "figures": figures}
    publish(result, markdown(result), args.out, args.markdown)


if __name__ == "__main__":
    main()

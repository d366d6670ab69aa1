"""PCM-Net in the demo's synthetic world: do salient concepts + mix-up and the CLIP-weighted loss help most when the
"text-to-image model" makes defects often?

The world's renderer, run on the text part's scenes, stands in for the text-to-image model; a defect is the salient
object drawn in the wrong colour or the wrong shape (half each), with probability p per scene. The demo's tiny
CLIP and LM (its settings and seed) are trained, then MacCap's projector: text only (the demo's method), and on
(synthetic image, caption) pairs plain, + PCM (salient concepts, mix-up, concept tokens), + the CLIP-weighted loss,
+ both, at p = 0 and p = 0.3 (and + both with the focal factor at p = 0.3). Every variant captions the same
held-out real images; CIDEr and CLIPScore (2.5 max(cos, 0) with the world's CLIP) per image, 95% bootstrap
intervals over images, and paired differences against "synthetic, plain" at the same p.

    python benchmarks/pcm_world.py --out benchmarks/results/pcm_world/seed0
    python benchmarks/pcm_world.py --out benchmarks/results/pcm_world/seed1 --projector-seed 1   # same CLIP and LM
    python benchmarks/pcm_world.py --across benchmarks/results/pcm_world/seed* --out benchmarks/results/pcm_world

The CLIP and LM are the demo's (`maccap demo`'s settings, about 3 minutes on an idle 2-core machine); a run in an
--out that holds them (work/clip, work/lm) reuses them. The projectors and the scoring take about 8 minutes on one
thread.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_maccap.demo import components, report, world  # noqa: E402
from modeling_maccap.demo.demo import DemoSettings, _caption, world_part  # noqa: E402

PROBABILITIES = (0.0, 0.3)
# (name, PCMSettings fields); every synthetic variant has patch keys and the label-smoothed loss (eps 0.1).
VARIANTS = (
    ("synthetic, plain", dict(mixup=False, weighted_loss=False)),
    ("+ PCM", dict(mixup=True, weighted_loss=False)),
    ("+ CLIP-weighted loss", dict(mixup=False, weighted_loss=True)),
    ("+ both", dict(mixup=True, weighted_loss=True)),
)
FOCAL = ("+ both, focal gamma 2", dict(mixup=True, weighted_loss=True, focal_gamma=2.0))
TEMPLATES = ("a {}", "a large {}", "{}")


def world_concepts():
    """The world's concept vocabulary: every colour, shape and colour-shape pair, and the backgrounds."""
    pairs = [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES]
    return [*pairs, *world.COLOURS, *world.SHAPES, *(f"{b} ground" for b in world.BACKGROUNDS)]


def corrupt(scene, rng):
    """The scene with its salient object in another colour or another shape (half each)."""
    s = scene.salient
    if rng.random() < 0.5:
        colour = str(rng.choice([c for c in world.COLOURS if c != s.colour]))
        s = dataclasses.replace(s, colour=colour)
    else:
        s = dataclasses.replace(s, shape=str(rng.choice([x for x in world.SHAPES if x != s.shape])))
    return dataclasses.replace(scene, objects=(s, *scene.objects[1:]))


def synthetic_images(scenes, p, settings):
    """Each text scene rendered, its salient object corrupted with probability p; and which were."""
    rng = np.random.default_rng([settings.seed, 30, round(p * 1000)])
    images, corrupted = [], []
    for scene, _ in scenes:
        bad = rng.random() < p
        corrupted.append(bad)
        images.append(Image.fromarray((corrupt(scene, rng) if bad else scene).render(settings.image_size)))
    return images, np.asarray(corrupted)


class IndexedPairCollator:
    """Rows {"caption", "image": its scene's index} -> what pcm_loss reads, from pixel values made once."""

    def __init__(self, pixel_values):
        self.pixel_values = pixel_values

    def __call__(self, processor):
        def collate(rows):
            captions = [row["caption"] for row in rows]
            clip = processor.clip_text_inputs(captions)
            return {"pixel_values": self.pixel_values[[row["image"] for row in rows]],
                    **processor.caption_lm_inputs(captions),
                    "clip_input_ids": clip["input_ids"], "clip_attention_mask": clip["attention_mask"]}
        return collate


def training_arguments(settings):
    """The demo's projector schedule (components.hub_config) at this run's step count and batch size."""
    return {"learning_rate": settings.projector_learning_rate, "weight_decay": 0.01,
            "warmup_steps": settings.projector_steps // 20, "lr_scheduler_type": "cosine_warmup_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": 0.1, "warmup_lr_rate": 0.01}, "max_grad_norm": 1.0,
            "per_device_train_batch_size": settings.batch_size, "max_steps": settings.projector_steps,
            "save_strategy": "no", "logging_steps": settings.projector_steps, "disable_tqdm": True,
            "seed": settings.seed, "report_to": "none", "dataloader_pin_memory": False, "use_cpu": True}


def caption(folder, pixel_values, seed):
    from modeling_maccap import MacCapForConditionalGeneration

    return _caption(MacCapForConditionalGeneration.from_pretrained(folder).eval(), pixel_values, seed, {})


def clip_scores(clip_model, processor, image_embeds, captions):
    """CLIPScore per image, 2.5 max(cos, 0), without a text prefix (the world's CLIP never read one)."""
    import torch

    with torch.no_grad():
        tokens = processor.clip_text_inputs(captions)
        text = torch.nn.functional.normalize(clip_model.get_text_features(**tokens).pooler_output, dim=-1)
    return (2.5 * (text * image_embeds).sum(-1).clamp(min=0)).numpy()


def pair_weights(clip_model, processor, pixel_values, captions, corrupted, per_scene, alpha=2.5):
    """PCM-Net's weights clamp(alpha cos, 0, 1) of the synthetic pairs: their mean and the share below 1, for the
    pairs of clean and of corrupted scenes."""
    import torch

    from modeling_maccap.tools.pcm import clip_weights

    with torch.no_grad():
        image = clip_model.get_image_features(pixel_values=pixel_values).pooler_output
        text = torch.cat([clip_model.get_text_features(**processor.clip_text_inputs(captions[i:i + 2000])).pooler_output
                          for i in range(0, len(captions), 2000)])
    weights = clip_weights(image.repeat_interleave(per_scene, 0), text, alpha).numpy()
    bad = np.repeat(corrupted, per_scene)
    return {kind: {"pairs": int(mask.sum()), "mean_weight": float(weights[mask].mean()) if mask.any() else None,
                   "share_below_1": float((weights[mask] < 1).mean()) if mask.any() else None}
            for kind, mask in (("clean", ~bad), ("corrupted", bad))}


def run(out, settings, projector_batch_size=64, projector_seed=None, log=print):
    import torch
    from transformers import CLIPModel

    from modeling_maccap import MacCapProcessor
    from modeling_maccap.tools.evaluation import caption_scores, find_java
    from modeling_maccap.tools.pcm import PCMSettings, train_pcm
    from modeling_maccap.tools.training import train

    java = find_java()
    out, started, timings = Path(out), time.perf_counter(), {}
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    def stage(name, function, *args, **kwargs):
        t = time.perf_counter()
        result = function(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t, 1)
        log(f"{name}: {timings[name]:.0f} s")
        return result

    parts = {name: world_part(settings, name) for name in ("clip", "text", "test")}
    (clip_scenes, clip_images), (text_scenes, _), (test_scenes, test_images) = (parts[n] for n in ("clip", "text",
                                                                                                    "test"))
    captions = [c for _, cs in text_scenes for c in cs]
    captions_file = work / "text_captions.json"
    captions_file.write_text(json.dumps(captions), encoding="utf-8")
    # A rerun in the same --out reuses the CLIP and LM it trained (they depend only on the demo's settings and seed).
    done = {name: (work / name / "config.json").exists() for name in ("clip", "lm")}
    clip = str(work / "clip") if done["clip"] else stage("CLIP", components.clip_folder, settings, clip_scenes,
                                                          clip_images, work / "clip", log)
    lm = str(work / "lm") if done["lm"] else stage("LM", components.lm_folder, settings, text_scenes, work / "lm", log)
    folders = {}
    # From here on: the projectors' batch, and their seed (also the defects' draws, the noise and the bootstrap).
    # The paper's noise variance, in training and at inference, for every projector here (the PCM-Net ones take
    # MacCapConfig's defaults): the README's PCM tables were measured so, before the demo scaled its own.
    settings = dataclasses.replace(settings, batch_size=projector_batch_size, noise_variance=0.016,
                                   seed=settings.seed if projector_seed is None else projector_seed)
    hub_config = components.hub_config(settings, work, captions_file, clip, lm, settings.noise_variance)
    folders["text-only MacCap"] = stage("text-only MacCap", train, hub_config, work / "text-only",
                                        cache_dir=work / "features")

    processor = MacCapProcessor.from_pretrained_components(clip=clip, lm=lm)
    maccap = {"num_queries": settings.num_queries, "aligner_heads": 4, "aligner_ffn_dim": 4 * settings.lm_width}
    import datasets

    per_scene = settings.captions_per_scene
    pairs = datasets.Dataset.from_dict({"caption": captions, "image": np.arange(len(captions)) // per_scene})
    corrupted_share, weights = {}, {}
    clip_model = CLIPModel.from_pretrained(clip).eval()
    for p in PROBABILITIES:
        images, corrupted = synthetic_images(text_scenes, p, settings)
        corrupted_share[p] = float(corrupted.mean())
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        weights[p] = pair_weights(clip_model, processor, pixel_values, captions, corrupted, per_scene)
        for name, fields in VARIANTS + ((FOCAL,) if p > 0 else ()):
            key = f"p={p:g}: {name}"
            folders[key] = stage(key, train_pcm, pairs, work / key.replace(" ", "_").replace(":", "").replace(",", ""),
                                 clip=clip, lm=lm, settings=PCMSettings(**fields), concepts=world_concepts(),
                                 templates=TEMPLATES, maccap=maccap, training_arguments=training_arguments(settings),
                                 cache_dir=work / "features", collator=IndexedPairCollator(pixel_values))

    t = time.perf_counter()
    test_pixels = processor(images=test_images)["pixel_values"]
    with torch.no_grad():
        image_embeds = torch.nn.functional.normalize(
            clip_model.get_image_features(pixel_values=test_pixels).pooler_output, dim=-1)
    predictions = {name: caption(folder, test_pixels, settings.seed) for name, folder in folders.items()}
    references = {str(i): cs for i, (_, cs) in enumerate(test_scenes)}
    boot = dict(samples=settings.bootstrap_samples, seed=settings.seed)
    rows, per_image = {}, {}
    for name, captions_ in predictions.items():
        cider = np.asarray(caption_scores(references, {str(i): c for i, c in enumerate(captions_)}, java)
                           ["CIDEr_per_image"])
        clipscore = clip_scores(clip_model, processor, image_embeds, captions_)
        per_image[name] = (cider, clipscore)
        named = [world.salient_words_named(c, scene) for c, (scene, _) in zip(captions_, test_scenes)]
        rows[name] = {"CIDEr": report.interval(report.mean, cider, **boot),
                      "CLIPScore": report.interval(report.mean, clipscore, **boot),
                      "salient_colour_right": float(np.mean([n["colour"] for n in named])),
                      "salient_shape_right": float(np.mean([n["shape"] for n in named]))}
    for name in rows:
        if name.startswith("p=") and not name.endswith("plain"):
            base = name.split(":")[0] + ": synthetic, plain"
            rows[name]["CIDEr_vs_plain"] = report.interval(report.difference, per_image[name][0],
                                                           per_image[base][0], **boot)
            rows[name]["CLIPScore_vs_plain"] = report.interval(report.difference, per_image[name][1],
                                                               per_image[base][1], **boot)
    timings["captioning and scoring"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - started, 1)
    results = {"settings": dataclasses.asdict(settings), "torch_threads": torch.get_num_threads(),
               "concepts": world_concepts(), "templates": TEMPLATES, "corrupted_share": corrupted_share,
               "pair_weights": weights,
               "rows": rows, "timings_s": timings}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "predictions.json").write_text(json.dumps(predictions, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    plot(results, out / "pcm_world.png")
    return results


def _ci(e, digits=3):
    return f"{e['value']:.{digits}f} [{e['low']:.{digits}f}, {e['high']:.{digits}f}]"


def markdown(results):
    s = results["settings"]
    lines = [f"PCM-Net in the demo's world, seed {s['seed']}: {s['text_scenes']} text scenes x "
             f"{s['captions_per_scene']} captions as pairs, {s['projector_steps']} projector steps at batch "
             f"{s['batch_size']} (CLIP and LM: the demo's), {s['test_scenes']} held-out real images; "
             f"{results['torch_threads']} threads, "
             f"{results['timings_s']['total']:.0f} s. Corrupted synthetic scenes: "
             + ", ".join(f"p={p}: {v:.1%}" for p, v in results["corrupted_share"].items()) + ".",
             "CLIP weights clamp(2.5 cos, 0, 1) of the pairs: " + "; ".join(
                 f"p={p}: {kind} {w[kind]['mean_weight']:.3f} mean, {w[kind]['share_below_1']:.1%} below 1"
                 for p, w in results.get("pair_weights", {}).items() for kind in w if w[kind]["pairs"]) + ".", "",
             "| setting | CIDEr [95%] | CLIPScore [95%] | CIDEr vs plain | CLIPScore vs plain | salient colour / shape right |",
             "|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        vs = [_ci(r[k]) if k in r else "" for k in ("CIDEr_vs_plain", "CLIPScore_vs_plain")]
        lines.append(f"| {name} | {_ci(r['CIDEr'])} | {_ci(r['CLIPScore'])} | {vs[0]} | {vs[1]} | "
                     f"{r['salient_colour_right']:.0%} / {r['salient_shape_right']:.0%} |")
    return "\n".join(lines) + "\n"


def across(run_dirs):
    """Each variant's CIDEr and CLIPScore, and its difference from "synthetic, plain", in several runs (one column
    each) and their mean: the spread between training seeds, which the intervals over images do not hold."""
    runs = [json.loads((Path(d) / "results.json").read_text(encoding="utf-8")) for d in run_dirs]
    seeds = [r["settings"]["seed"] for r in runs]
    lines = ["| setting | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * (len(runs) + 1)]
    for name in runs[0]["rows"]:
        for metric in ("CIDEr", "CLIPScore"):
            for key, label in ((metric, metric), (f"{metric}_vs_plain", f"{metric} vs plain")):
                if key not in runs[0]["rows"][name]:
                    continue
                values = [r["rows"][name][key] for r in runs]
                cells = [_ci(v, 2) for v in values]
                mean = sum(v["value"] for v in values) / len(values)
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {mean:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("CIDEr", "CLIPScore")):
        values = [results["rows"][n][metric] for n in names]
        ax.barh(range(len(names)), [v["value"] for v in values],
                xerr=[[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]],
                color=["gray"] + ["tab:blue" if n.startswith("p=0:") else "tab:red" for n in names[1:]])
        ax.set_yticks(range(len(names)), names if metric == "CIDEr" else [""] * len(names))
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric} on held-out real images (95% bootstrap)")
    fig.suptitle("PCM-Net in the demo's world: defect probability p = 0 (blue) and 0.3 (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/pcm_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-scenes", type=int, default=6000)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--projector-steps", type=int, default=300)
    parser.add_argument("--projector-batch-size", type=int, default=64)
    parser.add_argument("--projector-seed", type=int, help="seed of the projectors, the defects, the noise and the "
                                                           "bootstrap (default: --seed)")
    parser.add_argument("--across", nargs="+", metavar="RUN_DIR", help="instead of a run: the table of earlier runs "
                                                                      "side by side (written to OUT/across_seeds.md)")
    args = parser.parse_args()
    if args.across:
        table = across(args.across)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "across_seeds.md").write_text(table, encoding="utf-8")
        print(table)
        return
    from modeling_maccap.demo.demo import _quiet

    # lm_copy_target 0: the LM of the first 600 steps, without the demo's probe rounds, as the committed results
    # under benchmarks/results/pcm_world were measured.
    settings = DemoSettings(seed=args.seed, text_scenes=args.text_scenes, test_scenes=args.test_scenes,
                            projector_steps=args.projector_steps, lm_copy_target=0.0)
    with _quiet():
        results = run(args.out, settings, args.projector_batch_size, args.projector_seed)
    print(markdown(results))


if __name__ == "__main__":
    main()

"""`maccap demo`: the whole method, offline, on a synthetic world, with the paper's ablations (not remote code).

1. A world of coloured shapes (`world.py`), split into disjoint parts.
2. A tiny CLIP trained contrastively on (image, caption) pairs of the "clip" part, and a tiny decoder LM pretrained
   on the captions of the "text" part (the frozen LM must know the world's language, as GPT-2 knows English).
3. MacCap's projector trained text-only on the "text" captions through `training.train`, as `maccap train`
   does: with noise injection (at the demo's variance), and without it. The upper bound trains the first of them
   on for as many steps on the images of the "text" scenes as `generate()` sees them instead of their caption
   embeddings (the only run that sees images).
4. Held-out "test" images captioned by `generate()` in each setting of ROWS, scored per image by pycocoevalcap,
   with bootstrap intervals over images, diagnostics that say why a component helps or not, two plots, a
   results page and a contact sheet (`report.py`).
"""

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import components, report, world

# The rows of the table: (name, which model writes the captions, config fields set for generate(), what changes).
ROWS = (
    ("full method", "noise", {}, "subregion aggregation, noise injection in training, 4 candidates reranked by CLIP"),
    ("no training noise", "no_noise", {}, "the projector trained on clean caption embeddings (variance 0)"),
    ("cls subregion mode", "noise", {"subregion_mode": "cls"}, "k copies of the global image embedding"),
    ("no reranking", "noise", {"rerank": False}, "one noisy draw per image, plain beam search"),
    ("upper bound: image features", "image", {}, "the full method's projector trained on for as many steps on the "
                                                  "text part's images as generate() sees them (subregion features, "
                                                  "inference noise) instead of on their caption embeddings"),
    ("floor: LM without prefix", "lm_alone", {}, "the frozen LM's own beam-search caption, the same for every image"),
    ("control: shuffled images", "shuffled", {}, "the full method's captions, each scored against another "
                                                "held-out image's references"),
)
# Each effect is a paired difference of per-image CIDEr: (name, with, without).
EFFECTS = (
    ("noise injection", "full method", "no training noise"),
    ("subregion aggregation", "full method", "cls subregion mode"),
    ("reranking", "full method", "no reranking"),
    ("image-specific captions", "full method", "control: shuffled images"),
    ("the prefix", "full method", "floor: LM without prefix"),
    ("modality gap left", "upper bound: image features", "full method"),
    ("modality gap without noise injection", "upper bound: image features", "no training noise"),
)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. The defaults run in under 10 minutes on 2 CPU cores."""

    seed: int = 0
    image_size: int = 32
    patch_size: int = 8  # 16 patches + CLS = 17 vision tokens, enough for k = 10 subregions
    clip_scenes: int = 8000
    text_scenes: int = 6000
    test_scenes: int = 500
    captions_per_scene: int = 5
    batch_size: int = 128
    clip_width: int = 64
    clip_layers: int = 4
    projection_dim: int = 64
    # At 1000 steps (9 colours, 4 shapes) this CLIP told the salient object's quadrant 60% of the time; at 1500 100%.
    clip_steps: int = 1500
    clip_learning_rate: float = 2e-3
    clip_group_size: int = 4  # scenes per hard-negative group in a CLIP batch (components._hard_negative_batch)
    clip_patch_alignment: float = 1.0  # weight of the patch-token contrastive term (components.clip_folder)
    # The LM is pretrained on documents of captions of one scene: every position a prefix can push a caption into
    # is then trained to continue from (and copy) context about the same scene, which is what a prefix is.
    lm_width: int = 64
    lm_layers: int = 2
    # Which words the LM learns to copy in 600 steps is chaotic: it changes with the seed, the width, the heads, the
    # captions' wording and even the thread count (docs/demo/history.md, "Why results changed with the seed, the CPU
    # and the thread count"). In the earlier world these settings copied the salient colour, shape and position on
    # seed 0 at 2 threads, on the AMD and the Intel machine; in this one seed 0's LM does not copy the position (AMD).
    lm_heads: int = 4
    lm_steps: int = 600
    # After lm_steps the LM is probed on lm_probe_scenes scenes it never saw; while it copies one of the words of
    # components.COPIED_WORDS less often than lm_copy_target, it trains lm_round_steps more (a warm restart), at most
    # lm_max_rounds times (components.lm_folder). Two LMs that had not learned to copy a word at 600 steps (seeds 1
    # and 2, 1 thread) learned it in 200 and 600 more.
    lm_copy_target: float = 0.9
    lm_probe_scenes: int = 200
    lm_round_steps: int = 200
    lm_round_learning_rate: float = 3e-3
    lm_max_rounds: int = 3
    lm_document_captions: int = 8  # captions of one scene per pretraining document, drawn with replacement
    lm_learning_rate: float = 6e-3
    num_queries: int = 16
    # Noise injection's variance, in training and at inference. The paper's 0.016 puts a noisy caption embedding of
    # ViT-B/32 (512 dimensions) at cosine 0.33 from its caption, about where that CLIP's images sit from their
    # captions; in this CLIP's 64 dimensions it puts it at 0.70, while images sit at 0.88, and at 0.016 the noise
    # erased the salient colour (an earlier world, AMD) or shape (seed 1) from most captions. 0.005 puts a noisy
    # caption where this CLIP's images sit (README, the demo's step 3).
    noise_variance: float = 0.005
    # At 500 steps and lr 1e-3 the projector was the bottleneck: given a caption's own clean CLIP embedding it named
    # the colour 71% of the time, at 1000 steps and 3e-3 89% (in the earlier world: `git show 22de159:README.md`).
    projector_steps: int = 1000
    projector_learning_rate: float = 3e-3
    bootstrap_samples: int = 2000
    contact_sheet_images: int = 24


# ---------------------------------------------------------------------------------------------- evaluation
def _caption(model, pixel_values, seed, config_overrides, batch_size=100):
    """Captions by `generate()` of preprocessed images, with some config fields (subregion_mode, rerank) set for
    the call."""
    import torch

    before = {name: getattr(model.config, name) for name in config_overrides}
    for name, value in config_overrides.items():
        setattr(model.config, name, value)
    try:
        captions = []
        with torch.no_grad():
            for start in range(0, len(pixel_values), batch_size):
                ids = model.generate(pixel_values=pixel_values[start:start + batch_size], noise_seed=seed)
                captions += model.processor.batch_decode(ids)
    finally:
        for name, value in before.items():
            setattr(model.config, name, value)
    return captions


def _lm_alone_caption(model):
    """The frozen LM's beam-search caption from BOS alone, decoded as MacCap decodes (its generation config)."""
    import torch

    lm, config = model.language_model, model.generation_config
    with torch.no_grad():
        ids = lm.generate(input_ids=torch.tensor([[lm.config.bos_token_id]]), num_beams=config.num_beams,
                          max_new_tokens=config.max_new_tokens, pad_token_id=config.pad_token_id,
                          eos_token_id=config.eos_token_id, do_sample=False)
    return model.processor.batch_decode(ids[:, 1:])[0]


def _derangement(count, seed):
    """A permutation of range(count) that moves every index (the shuffled-image control)."""
    rng = np.random.default_rng([seed, 20])
    while True:
        order = rng.permutation(count)
        if count < 2 or not (order == np.arange(count)).any():
            return order


def _scores(references, predictions, java):
    """Corpus BLEU-4 and per-image CIDEr of each setting (pycocoevalcap; the references tokenized once)."""
    from ..tools.evaluation import caption_scores

    return {row: caption_scores(references, captions, java) for row, captions in predictions.items()}


def _caption_to_image_hits(model, captions, image_embeds):
    """1 where the demo's CLIP, given a caption, ranks its own image first among the held-out images."""
    import torch

    with torch.no_grad():
        text = model.embed_texts(captions)
    return ((text @ image_embeds.T).argmax(1) == torch.arange(len(captions))).float().numpy()


def _salient_words_right(captions, test):
    """Of captions given in the held-out order, the shares that name their image's salient colour, shape and
    position and its background rightly (the position and the background among those naming one; None if none
    does), and the shares naming a position and a background."""
    named = [world.salient_words_named(caption, scene) for caption, (scene, _) in zip(captions, test)]
    out = {"colour": float(np.mean([n["colour"] for n in named])),
           "shape": float(np.mean([n["shape"] for n in named]))}
    for word in ("position", "background"):
        said = [n[word] for n in named if n[word] is not None]
        out[word] = float(np.mean(said)) if said else None
        out[f"names_a_{word}"] = len(said) / len(named)
    return out


def _clip_names_salient_position(model, test, image_embeds):
    """How often the demo's CLIP, among "a <colour> <shape> in the <position>" for the four positions, ranks the
    salient object's own position closest to the image: whether an image embedding carries where things are."""
    import torch

    positions = list(world.POSITIONS)
    captions = [f"{scene.salient.phrase(False)} in the {p}" for scene, _ in test for p in positions]
    with torch.no_grad():
        text = model.embed_texts(captions).view(len(test), len(positions), -1)
    picked = (text @ image_embeds.unsqueeze(-1)).squeeze(-1).argmax(1)
    return sum(positions[int(i)] == scene.salient.position for i, (scene, _) in zip(picked, test)) / len(test)


def noise_variance_at_cosine(cosine, dim):
    """The noise variance v at which a unit vector plus N(0, v I_dim) noise sits at `cosine` from itself (about
    1 / sqrt(1 + dim v)): where `cosine` is an image's from its captions, the variance at which a noisy caption sits
    from its caption as far as an image does (for ViT-B/32, dim 512 and a cosine near 0.3, about 0.02, the paper's
    order). None for a cosine <= 0 (an untrained CLIP): no noise puts a noisy copy that far from itself."""
    return (1 / cosine**2 - 1) / dim if cosine > 0 else None


def _diagnostics(models, test, pixel_values, sub):
    """Measured numbers that explain the table: how much a prefix tells the LM, how well the tiny CLIP matches
    held-out images with their captions, its modality gap, where the subregion features sit, and how far the
    paper's noise moves a caption. Returns (diagnostics, the embeddings for the modality-gap plot)."""
    import torch
    import torch.nn.functional as F

    model, processor = models["noise"], models["noise"].processor
    captions = [c for _, cs in test for c in cs]
    per_scene = len(test[0][1])
    with torch.no_grad():
        text = model.embed_texts(captions).view(len(test), per_scene, -1)
        first = text[:, 0]
        recall = ((sub.image_embeds @ first.T).argmax(1) == torch.arange(len(test))).float().mean().item()
        regions = F.normalize(sub.subregion_features, dim=-1)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(first.shape, generator=generator) * model.config.train_noise_variance**0.5
        noisy = F.normalize(first + noise, dim=-1)
        # Teacher-forced caption loss (nats per token) of every reference, with and without a prefix.
        lm_inputs = processor.caption_lm_inputs(captions)
        images = pixel_values.repeat_interleave(per_scene, 0)
        torch.manual_seed(0)  # the oracle's prefix carries the training noise, as in training
        losses = {
            "loss_lm_alone": model.language_model(**lm_inputs).loss.item(),
            "loss_oracle_prefix": model(**lm_inputs, clip_text_embeds=text.flatten(0, 1)).loss.item(),
            "loss_image_prefix": model(**lm_inputs, pixel_values=images).loss.item(),
            "loss_image_prefix_no_noise": models["no_noise"](**lm_inputs, pixel_values=images).loss.item(),
            "loss_image_prefix_upper_bound": models["image"](**lm_inputs, pixel_values=images).loss.item(),
        }
    image_embeds = sub.image_embeds.numpy()
    cos_gap = (sub.image_embeds.unsqueeze(1) * text).sum(-1).mean().item()
    dim = text.shape[-1]
    copies = components.lm_copy_rates(model.language_model, processor.tokenizer, test)
    diagnostics = {
        "train_noise_variance": model.config.train_noise_variance,
        **losses,
        "lm_copies_salient_colour": copies["colour"],
        "chance_colour": 1 / len(world.COLOURS),
        "lm_copies_salient_shape": copies["shape"],
        "chance_shape": 1 / len(world.SHAPES),
        "lm_copies_salient_position": copies["position"],
        "clip_names_salient_position": _clip_names_salient_position(model, test, sub.image_embeds),
        "chance_position": 1 / len(world.POSITIONS),
        "lm_copies_background": copies["background"],
        "chance_background": 1 / len(world.BACKGROUNDS),
        "clip_image_to_caption_R@1": recall,
        "cos_image_paired_captions": cos_gap,
        "cos_captions_of_one_image": torch.einsum("bcd,bed->bce", text, text).mean().item(),
        "cos_subregion_features_paired_captions": torch.einsum("bkd,bcd->bkc", regions, text).mean().item(),
        "cos_caption_noisy_copy": (noisy * first).sum(-1).mean().item(),
        "joint_space_dim": dim,
        "noise_variance_matching_the_gap": noise_variance_at_cosine(cos_gap, dim),
        "gap_centroid_distance": float(np.linalg.norm(image_embeds.mean(0) - first.numpy().mean(0))),
        "gap_centroid_distance_noisy": float(np.linalg.norm(image_embeds.mean(0) - noisy.numpy().mean(0))),
    }
    return diagnostics, (image_embeds, first.numpy(), noisy.numpy())


def _estimates(scores, hits, settings):
    """Each row's CIDEr and R@1, each effect, and the two fractions of the gap, with their intervals."""
    per_image = {row: np.asarray(s["CIDEr_per_image"]) for row, s in scores.items()}
    boot = dict(samples=settings.bootstrap_samples, seed=settings.seed)
    rows = {row: {"CIDEr": report.interval(report.mean, per_image[row], **boot), "BLEU-4": scores[row]["BLEU-4"],
                  "caption_to_image_R@1": report.interval(report.mean, hits[row], **boot)} for row in scores}
    effects = {name: report.interval(report.difference, per_image[a], per_image[b], **boot)
               for name, a, b in EFFECTS}
    full, ceiling = per_image["full method"], per_image["upper bound: image features"]
    gap_closed = {
        "method between floor and ceiling": report.interval(
            report.fraction_of_range, full, per_image["floor: LM without prefix"], ceiling, **boot),
        "noise injection closes of the modality gap": report.interval(
            report.fraction_of_range, full, per_image["no training noise"], ceiling, **boot),
    }
    return rows, effects, gap_closed


# ------------------------------------------------------------------------------------------------- the run
# The world's three parts and the DemoSettings field that sizes each.
PART_SIZES = {"clip": "clip_scenes", "text": "text_scenes", "test": "test_scenes"}


def world_part(settings, name):
    """One part of the demo's world for these settings ("clip", "text" or "test"): its (scene, captions) pairs and
    the scenes' rendered images, the same on every call."""
    scenes = world.sample_part(settings.seed, name, getattr(settings, PART_SIZES[name]), settings.captions_per_scene)
    return scenes, [Image.fromarray(scene.render(settings.image_size)) for scene, _ in scenes]


def run_demo(output_dir, settings=DemoSettings(), log=print):
    """Build the world, train CLIP, the LM and three projectors, caption the test part in the settings of ROWS,
    score them, and write results.json, results.md, predictions.json, contact_sheet.html, ablations.png and
    modality_gap.png into `output_dir`. Returns the results dictionary."""
    from ..tools.evaluation import find_java

    java = find_java()  # before minutes of training, not after
    with _quiet():
        return _run(Path(output_dir), settings, log, java)


@contextlib.contextmanager
def _quiet():
    """transformers' and datasets' warnings and progress bars off while the demo prints its own progress."""
    import datasets
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    dataset_bars = datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if dataset_bars:
            datasets.enable_progress_bars()


def _run(output_dir, settings, log, java):
    from transformers import set_seed

    from ..tools.training import train

    started = time.perf_counter()
    work = output_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    timings = {}

    def stage(name, function, *args, **kwargs):
        t = time.perf_counter()
        set_seed(settings.seed)
        result = function(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t, 1)
        log(f"{name}: {timings[name]:.0f} s")
        return result

    def make_world():
        parts = {name: world_part(settings, name) for name in PART_SIZES}
        return {name: scenes for name, (scenes, _) in parts.items()}, {name: ims for name, (_, ims) in parts.items()}

    log(f"maccap demo, seed {settings.seed}: {settings.clip_scenes} scenes for CLIP, {settings.text_scenes} for "
        f"captions, {settings.test_scenes} held out")
    parts, images = stage("world", make_world)
    text_captions = [c for _, captions in parts["text"] for c in captions]
    captions_file = work / "text_captions.json"
    captions_file.write_text(json.dumps(text_captions), encoding="utf-8")

    clip = stage("CLIP (contrastive, clip part)", components.clip_folder, settings, parts["clip"], images["clip"],
                 work / "clip", log)
    lm = stage("LM (pretrained on text part captions)", components.lm_folder, settings, parts["text"], work / "lm",
               log)
    folders = {}
    for name, variance in (("noise", settings.noise_variance), ("no_noise", 0.0)):
        hub_config = components.hub_config(settings, work, captions_file, clip, lm, variance)
        folders[name] = stage(f"projector, text only, noise variance {variance:g}", train, hub_config,
                              work / f"maccap-{name}", cache_dir=work / "features")
    folders["image"] = stage("the same projector on image features (upper bound)",
                             components.train_on_image_features,
                             components.hub_config(settings, work, captions_file, clip, lm,
                                                  settings.noise_variance),
                             images["text"], text_captions, work / "maccap-image", init_from=folders["noise"])

    lm_probes = json.loads((Path(lm) / "pretraining_probes.json").read_text(encoding="utf-8"))
    results, predictions, references, embeddings = _evaluate(folders, parts["test"], images["test"], settings, java,
                                                             log, timings, lm_probes)
    timings["total"] = round(time.perf_counter() - started, 1)
    _write_outputs(output_dir, results, predictions, references, images["test"], embeddings, settings)
    return results


def _evaluate(folders, test, test_images, settings, java, log, timings, lm_probes):
    """Caption the held-out images in every setting of ROWS with the trained models in `folders`, and measure
    (`lm_probes`: the LM's pretraining probes, reported with the diagnostics). Returns (results, predictions,
    references, the embeddings of the modality-gap plot)."""
    import torch

    from ..modeling_maccap import MacCapForConditionalGeneration

    t = time.perf_counter()
    models = {name: MacCapForConditionalGeneration.from_pretrained(folder).eval() for name, folder in folders.items()}
    # The three models share the demo's CLIP and its image processor: the test images are preprocessed once.
    pixel_values = models["noise"].processor(images=test_images)["pixel_values"]
    with torch.no_grad():
        sub = models["noise"].get_subregion_features(pixel_values)
    predictions, order = {}, [int(i) for i in _derangement(settings.test_scenes, settings.seed)]
    for row, variant, overrides, _ in ROWS:
        if variant == "lm_alone":
            predictions[row] = [_lm_alone_caption(models["noise"])] * settings.test_scenes
        elif variant == "shuffled":
            predictions[row] = [predictions["full method"][i] for i in order]
        else:
            predictions[row] = _caption(models[variant], pixel_values, settings.seed, overrides)
    timings["captioning"] = round(time.perf_counter() - t, 1)
    log(f"captioning: {timings['captioning']:.0f} s")

    t = time.perf_counter()
    references = {str(i): captions for i, (_, captions) in enumerate(test)}
    named = {row: {str(i): c for i, c in enumerate(captions)} for row, captions in predictions.items()}
    scores = _scores(references, named, java)
    hits = {row: _caption_to_image_hits(models["noise"], captions, sub.image_embeds)
            for row, captions in predictions.items()}
    rows, effects, gap_closed = _estimates(scores, hits, settings)
    for row, captions in predictions.items():
        rows[row]["distinct_captions"] = len(set(captions))
        rows[row]["salient_words_right"] = _salient_words_right(captions, test)
    diagnostics, embeddings = _diagnostics(models, test, pixel_values, sub)
    diagnostics["lm_pretraining_probes"] = lm_probes
    timings["scoring"] = round(time.perf_counter() - t, 1)
    results = {
        "settings": dataclasses.asdict(settings),
        "torch_threads": torch.get_num_threads(),
        "metric_scale": "0-1, as pycocoevalcap reports them (x100 for the usual CIDEr figures)",
        "descriptions": {row: description for row, _, _, description in ROWS},
        "rows": rows,
        "components": effects,
        "gap_closed": gap_closed,
        "control_order": order,
        "diagnostics": diagnostics,
        "timings_s": timings,
    }
    results["findings"] = report.findings(results)
    return results, named, references, embeddings


def _write_outputs(output_dir, results, predictions, references, images, embeddings, settings):
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (output_dir / "predictions.json").write_text(
        json.dumps({"references": references, "predictions": predictions}, indent=2) + "\n", encoding="utf-8")
    (output_dir / "results.md").write_text(report.results_markdown(results), encoding="utf-8")
    (output_dir / "contact_sheet.html").write_text(
        report.contact_sheet(images[:settings.contact_sheet_images], predictions, references), encoding="utf-8")
    report.plot_ablations(results, output_dir / "ablations.png")
    report.plot_modality_gap(*embeddings, results["diagnostics"]["train_noise_variance"],
                             output_dir / "modality_gap.png")


# ---------------------------------------------------------------------------------------------------- CLI
def add_parser(commands):
    demo = commands.add_parser("demo", help="offline end-to-end demo: train CLIP, an LM and MacCap on a synthetic "
                                            "world, then caption held-out images with the paper's ablations")
    demo.add_argument("--output-dir", default="maccap-demo",
                      help="results.md/json, predictions.json, contact_sheet.html, the plots and the trained models "
                           "(default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="the world and every training run follow it (default: 0)")
    demo.add_argument("--across-seeds", nargs="+", metavar="RUN_DIR",
                      help="instead of a run: put the results of earlier runs (their output dirs, one per seed) side "
                           "by side, print the table and write it to OUTPUT_DIR/across_seeds.md")
    demo.set_defaults(run=run)


def run(args):
    if args.across_seeds:
        return _run_across_seeds(args.across_seeds, Path(args.output_dir))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    results = run_demo(args.output_dir, DemoSettings(seed=args.seed))
    print()
    print(report.results_markdown(results))
    print(f"written: {Path(args.output_dir) / 'results.md'}, results.json, predictions.json, contact_sheet.html, "
          "ablations.png, modality_gap.png")
    return 0


def _run_across_seeds(run_dirs, output_dir):
    from ..tools.errors import MacCapError

    runs = []
    for folder in map(Path, run_dirs):
        try:
            runs.append(json.loads((folder / "results.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise MacCapError(f"{folder}: no readable results.json of a `maccap demo` run ({error})") from None
    table = report.across_seeds(runs)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "across_seeds.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"written: {output_dir / 'across_seeds.md'}")
    return 0

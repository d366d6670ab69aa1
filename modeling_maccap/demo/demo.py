"""`maccap demo`: the whole method, offline, on a synthetic world, with the paper's ablations (not remote code).

1. A world of coloured shapes (`synthetic_world`), split into disjoint parts.
2. A tiny CLIP trained contrastively on (image, caption) pairs of the "clip" part, and a tiny GPT-2 pretrained
   on the captions of the "text" part (the frozen LM must know the world's language, as GPT-2 knows English).
3. MacCap's projector trained text-only on the "text" captions through `training.train`, as `maccap train`
   does: with the paper's noise, and without it. An upper bound trains the same projector on the CLIP image
   embeddings of the "text" scenes instead of their caption embeddings (the only run that sees images).
4. Held-out "test" images captioned by `generate()` in five settings, scored by `evaluation.caption_metrics`
   (pycocoevalcap), with diagnostics that say why a component helps or not; a results file and a contact sheet.
"""

import base64
import contextlib
import dataclasses
import html
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import world

# The rows of the table: (name, which trained projector, config fields set for generate(), what changes).
ROWS = (
    ("full method", "noise", {}, "subregion aggregation, noise injection in training, 4 candidates reranked by CLIP"),
    ("no training noise", "no_noise", {}, "the projector trained on clean caption embeddings (variance 0)"),
    ("cls subregion mode", "noise", {"subregion_mode": "cls"}, "k copies of the global image embedding"),
    ("no reranking", "noise", {"rerank": False}, "one noisy draw per image, plain beam search"),
    ("upper bound: image features", "image", {}, "the projector trained on the CLIP image embeddings of the "
                                                  "text part's scenes instead of their caption embeddings"),
)


DIAGNOSTIC_LABELS = {
    "loss_lm_alone": "caption loss (nats/token) of the LM alone",
    "loss_prefix_from_caption_embedding": "caption loss with the prefix from the caption's CLIP embedding",
    "loss_prefix_from_image": "caption loss with the prefix from the image (subregions, inference noise)",
    "loss_prefix_from_image_upper_bound": "the same for the upper bound's projector",
    "distinct_captions_full_method": "distinct captions written by the full method",
    "clip_image_to_caption_R@1": "CLIP image->caption R@1 among the held-out first references",
    "chance_R@1": "chance R@1",
    "cos_image_paired_captions": "cosine image / its captions",
    "cos_captions_of_one_image": "cosine between the captions of one image",
    "cos_subregion_features_paired_captions": "cosine subregion features (normalised) / the image's captions",
    "cos_caption_noisy_copy": "cosine caption / its noisy copy at the training variance",
}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. The defaults run in about 8 minutes on 2 CPU cores."""

    seed: int = 0
    image_size: int = 32
    patch_size: int = 8  # 16 patches + CLS = 17 vision tokens, enough for k = 10 subregions
    clip_scenes: int = 8000
    text_scenes: int = 6000
    test_scenes: int = 200
    captions_per_scene: int = 5
    width: int = 64  # CLIP towers' and the LM's hidden size
    layers: int = 2
    projection_dim: int = 64
    batch_size: int = 128
    clip_steps: int = 1500
    clip_learning_rate: float = 2e-3
    lm_steps: int = 300
    lm_learning_rate: float = 2e-3
    lm_captions_per_document: int = 3
    projector_steps: int = 400
    projector_learning_rate: float = 3e-3
    num_queries: int = 8
    contact_sheet_images: int = 24


# ------------------------------------------------------------------------------------------------ components
def _clip_folder(settings, scenes, images, folder, log):
    """Train the tiny CLIP contrastively on one random caption per scene and step; save it as a CLIP folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel, get_cosine_schedule_with_warmup

    from ..tools.tiny import tiny_clip_tokenizer, tiny_image_processor

    tokenizer = tiny_clip_tokenizer(world.vocabulary(), context_length=32)
    image_processor = tiny_image_processor("pil", side=settings.image_size)
    tower = dict(hidden_size=settings.width, intermediate_size=2 * settings.width, num_hidden_layers=settings.layers,
                 num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(tower, image_size=settings.image_size, patch_size=settings.patch_size),
        projection_dim=settings.projection_dim)
    torch.manual_seed(settings.seed)
    model = CLIPModel(config)
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.clip_learning_rate, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.clip_steps // 20, settings.clip_steps)
    rng = np.random.default_rng([settings.seed, 10])
    for step in range(settings.clip_steps):
        rows = rng.choice(len(scenes), settings.batch_size, replace=False)
        captions = [scenes[i][1][rng.integers(len(scenes[i][1]))] for i in rows]
        text = tokenizer(captions, padding=True, return_tensors="pt")
        loss = model(**text, pixel_values=pixel_values[torch.as_tensor(rows)], return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % max(settings.clip_steps // 4, 1) == 0:
            log(f"  CLIP step {step + 1}/{settings.clip_steps}: contrastive loss {loss.item():.3f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return str(folder)


def _lm_folder(settings, scenes, folder, log):
    """Pretrain a tiny GPT-2 on the text part's captions and save it as a causal-LM folder. A training document is
    a few captions of one scene, each as MacCap feeds it ([BOS, caption] ... EOS): like GPT-2 on web text, the LM
    learns from context as well as from the sentence itself, which is what lets a prefix steer it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup

    from ..tools.tiny import tiny_lm_tokenizer

    tokenizer = tiny_lm_tokenizer(world.vocabulary())
    bos = eos = tokenizer.eos_token_id  # GPT-2's <|endoftext|> is both
    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=settings.width,
                                       n_layer=settings.layers, n_head=4, bos_token_id=bos, eos_token_id=eos))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lm_learning_rate, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.lm_steps // 20, settings.lm_steps)
    rng = np.random.default_rng([settings.seed, 11])
    for step in range(settings.lm_steps):
        documents = []
        for i in rng.choice(len(scenes), settings.batch_size):
            captions = rng.permutation(scenes[i][1])[:settings.lm_captions_per_document]
            documents.append([t for c in captions for t in [bos] + tokenizer(str(c))["input_ids"]] + [eos])
        length = max(map(len, documents))
        input_ids = torch.tensor([d + [eos] * (length - len(d)) for d in documents])
        attention_mask = torch.tensor([[1] * len(d) + [0] * (length - len(d)) for d in documents])
        loss = model(input_ids=input_ids, attention_mask=attention_mask,
                     labels=input_ids.masked_fill(attention_mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % max(settings.lm_steps // 2, 1) == 0:
            log(f"  LM step {step + 1}/{settings.lm_steps}: loss {loss.item():.3f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------- projectors
def _hub_config(settings, folder, captions_file, clip_folder, lm_folder, train_noise_variance):
    """A hub config for `maccap train` on the demo's components: the paper's method at the demo's sizes."""
    config = {
        "hub": {"repo_id": "maccap/maccap-demo-synthetic-world", "model_name": "MacCap on the demo's synthetic world",
                "license": "apache-2.0"},
        "architecture": {
            "components": {"clip": clip_folder, "lm": lm_folder},
            # The paper's method (MacCapConfig's defaults) with a projector sized for the tiny CLIP and LM.
            "maccap": {"num_queries": settings.num_queries, "aligner_heads": 4, "aligner_ffn_dim": 4 * settings.width,
                       "train_noise_variance": train_noise_variance},
        },
        "corpus": {"file": captions_file.name, "column": "caption"},
        "training": {
            "max_caption_length": 25,
            "finetune_lm": False,
            "arguments": {
                "learning_rate": settings.projector_learning_rate, "weight_decay": 0.01,
                "warmup_steps": settings.projector_steps // 20, "lr_scheduler_type": "cosine_warmup_with_min_lr",
                "lr_scheduler_kwargs": {"min_lr_rate": 0.1, "warmup_lr_rate": 0.01}, "max_grad_norm": 1.0,
                "per_device_train_batch_size": settings.batch_size, "max_steps": settings.projector_steps,
                "save_strategy": "no", "logging_steps": max(settings.projector_steps // 2, 1),
                "disable_tqdm": True, "seed": settings.seed, "report_to": "none", "dataloader_pin_memory": False,
            },
        },
    }
    path = Path(folder) / f"hub_config_noise_{train_noise_variance}.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _train_on_image_features(hub_config_path, images, captions, output_dir):
    """The upper bound: the projector trained as in `training.train`, with each caption's CLIP text embedding
    replaced by the CLIP image embedding of its own scene."""
    import datasets
    import torch
    import torch.nn.functional as F
    from transformers import TrainingArguments, set_seed

    from ..tools.hub_config import load_hub_config
    from ..modeling_maccap import MacCapForConditionalGeneration
    from ..tools.training import FEATURE_COLUMN, CaptionCollator, MacCapTrainer

    hub_config = load_hub_config(hub_config_path)
    args = TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, label_names=["labels"],
                             **hub_config.training_arguments)
    set_seed(args.seed)
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=hub_config.clip, lm=hub_config.lm,
                                                                      **hub_config.maccap)
    processor = model.processor
    processor.max_caption_length = hub_config.max_caption_length
    with torch.no_grad():
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        image_embeds = F.normalize(model.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    per_scene = len(captions) // len(images)
    dataset = datasets.Dataset.from_dict({
        "caption": captions, FEATURE_COLUMN: image_embeds.repeat_interleave(per_scene, 0).numpy()})
    trainer = MacCapTrainer(model=model, args=args, train_dataset=dataset.with_format(
        "torch", columns=[FEATURE_COLUMN], output_all_columns=True), data_collator=CaptionCollator(processor),
        processing_class=processor)
    trainer.train()
    trainer.save_model(str(output_dir))
    return output_dir


# ---------------------------------------------------------------------------------------------- evaluation
def _caption(model, processor, pixel_values, seed, config_overrides, batch_size=50):
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
                captions += processor.batch_decode(ids)
    finally:
        for name, value in before.items():
            setattr(model.config, name, value)
    return captions


def _diagnostics(models, test, pixel_values, predictions):
    """Measured numbers that explain the table: how much the prefix tells the LM, how well the tiny CLIP matches
    held-out images with their captions, its modality gap, where the subregion features sit, and how far the
    paper's noise moves a caption."""
    import torch
    import torch.nn.functional as F

    model, processor = models["noise"], models["noise"].processor
    captions = [c for _, cs in test for c in cs]
    first = [cs[0] for _, cs in test]
    with torch.no_grad():
        sub = model.get_subregion_features(pixel_values)
        text = model.embed_texts(captions, processor).view(len(test), -1, sub.image_embeds.shape[-1])
        recall = ((sub.image_embeds @ text[:, 0].T).argmax(1) == torch.arange(len(test))).float().mean().item()
        regions = F.normalize(sub.subregion_features, dim=-1)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(text[:, 0].shape, generator=generator) * model.config.train_noise_variance**0.5
        # Teacher-forced caption loss (nats per token) of each image's first reference, with and without a prefix.
        lm_inputs = processor.caption_lm_inputs(first)
        torch.manual_seed(0)  # the training noise of the caption-embedding prefix
        losses = {
            "loss_lm_alone": model.language_model(**lm_inputs).loss.item(),
            "loss_prefix_from_caption_embedding": model(**lm_inputs, clip_text_embeds=text[:, 0]).loss.item(),
            "loss_prefix_from_image": model(**lm_inputs, pixel_values=pixel_values).loss.item(),
            "loss_prefix_from_image_upper_bound": models["image"](**lm_inputs, pixel_values=pixel_values).loss.item(),
        }
    return {
        "train_noise_variance": model.config.train_noise_variance,
        **losses,
        "distinct_captions_full_method": len(set(predictions["full method"].values())),
        "clip_image_to_caption_R@1": recall,
        "chance_R@1": 1 / len(test),
        "cos_image_paired_captions": (sub.image_embeds.unsqueeze(1) * text).sum(-1).mean().item(),
        "cos_captions_of_one_image": torch.einsum("bcd,bed->bce", text, text).mean().item(),
        "cos_subregion_features_paired_captions": torch.einsum("bkd,bcd->bkc", regions, text).mean().item(),
        "cos_caption_noisy_copy": (F.normalize(text[:, 0] + noise, dim=-1) * text[:, 0]).sum(-1).mean().item(),
    }


def _findings(table, diagnostics, settings):
    """What the table says, in measured terms: how much the prefix tells the LM, then, per ablation, by how much
    the component helps here or what measurement says why it does not."""
    d = diagnostics
    full = table["full method"]["CIDEr"]
    out = [f"How much the prefix tells the frozen LM: on each held-out image's first reference the LM alone has a "
           f"loss of {d['loss_lm_alone']:.3f} nats per token; with the prefix from that caption's own CLIP "
           f"embedding {d['loss_prefix_from_caption_embedding']:.3f}, and from the image "
           f"{d['loss_prefix_from_image']:.3f} (the distance between the two is the modality gap the method must "
           f"bridge). The full method writes {d['distinct_captions_full_method']} distinct captions for "
           f"{settings.test_scenes} images."]

    def delta(name):
        return full - table[name]["CIDEr"]

    gain = delta("no training noise")
    if gain > 0:
        out.append(f"Noise injection helps: without it CIDEr drops by {gain:.3f}. An image sits at cosine "
                   f"{d['cos_image_paired_captions']:.2f} from its captions here, and a noisy copy of a caption "
                   f"(variance {d['train_noise_variance']:g}) at {d['cos_caption_noisy_copy']:.2f} from the clean one: "
                   "trained on such copies, the projector reads embeddings near, not at, a caption.")
    else:
        out.append(f"Noise injection does not help here (CIDEr {-gain:+.3f} without it). The paper's variance was set "
                   f"for a 512-dimensional joint space; in this {settings.projection_dim}-dimensional one a noisy copy "
                   f"stays at cosine {d['cos_caption_noisy_copy']:.2f} from its caption, while an image sits at "
                   f"{d['cos_image_paired_captions']:.2f} from its captions: the noise does not span the gap.")
    gain = delta("cls subregion mode")
    if gain > 0:
        out.append(f"Subregion aggregation helps: with the global embedding alone CIDEr drops by {gain:.3f}.")
    else:
        out.append(f"Subregion aggregation does not help here (CIDEr {-gain:+.3f} with the global embedding alone). "
                   "This CLIP was trained to align only its CLS output with text, and its projected patch tokens are "
                   "not in the joint space: the normalised subregion features sit at cosine "
                   f"{d['cos_subregion_features_paired_captions']:.2f} from the image's captions, against "
                   f"{d['cos_image_paired_captions']:.2f} for the global embedding. The demo keeps the paper's "
                   "aggregation unchanged.")
    gain = delta("no reranking")
    if gain > 0:
        out.append(f"Reranking helps: with one noisy draw per image CIDEr drops by {gain:.3f}.")
    else:
        out.append(f"Reranking does not help here (CIDEr {-gain:+.3f} with one draw). It is only as good as CLIP's "
                   f"judgement: this CLIP puts an image's caption first among {settings.test_scenes} held-out "
                   f"captions {d['clip_image_to_caption_R@1']:.0%} of the time (chance {d['chance_R@1']:.1%}).")
    gain = table["upper bound: image features"]["CIDEr"] - full
    if gain > 0:
        out.append(f"The upper bound (the projector trained on image features, which a text-only method never has) "
                   f"is {gain:.3f} CIDEr above the full method: the cost of training on text alone here.")
    else:
        if d["loss_prefix_from_image_upper_bound"] >= d["loss_lm_alone"] - 0.01:
            why = (f"Its prefix from the image tells the LM nothing measurable: caption loss "
                   f"{d['loss_prefix_from_image_upper_bound']:.3f} against {d['loss_lm_alone']:.3f} for the LM alone, "
                   "so beam search writes the LM's own most likely captions.")
        else:
            why = (f"Its prefix from the image lowers the caption loss to {d['loss_prefix_from_image_upper_bound']:.3f} "
                   f"(LM alone {d['loss_lm_alone']:.3f}, full method {d['loss_prefix_from_image']:.3f}), but a lower "
                   "teacher-forced loss does not make beam search's captions closer to the references here.")
        out.append(f"The upper bound is not above the full method (CIDEr {gain:+.3f}). An image embedding does not say "
                   f"which part of its scene a caption describes, so it is a vaguer training target than the caption's "
                   f"own embedding. {why}")
    return out


# ------------------------------------------------------------------------------------------------- the run
def run_demo(output_dir, settings=DemoSettings(), log=print):
    """Build the world, train CLIP, the LM and three projectors, caption the test part in the five settings of
    ROWS, score them, and write `results.json`, `results.md`, `predictions.json` and `contact_sheet.html` into
    `output_dir`. Returns the results dictionary."""
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
    import torch
    from transformers import set_seed

    from ..configuration_maccap import MacCapConfig
    from ..tools.evaluation import caption_metrics
    from ..modeling_maccap import MacCapForConditionalGeneration
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
        parts = {name: world.sample_part(settings.seed, name, count, settings.captions_per_scene)
                 for name, count in (("clip", settings.clip_scenes), ("text", settings.text_scenes),
                                     ("test", settings.test_scenes))}
        images = {name: [Image.fromarray(scene.render(settings.image_size)) for scene, _ in scenes]
                  for name, scenes in parts.items()}
        return parts, images

    log(f"maccap demo, seed {settings.seed}: {settings.clip_scenes} scenes for CLIP, {settings.text_scenes} for "
        f"captions, {settings.test_scenes} held out")
    parts, images = stage("world", make_world)
    text_captions = [c for _, captions in parts["text"] for c in captions]
    captions_file = work / "text_captions.json"
    captions_file.write_text(json.dumps(text_captions), encoding="utf-8")

    clip_folder = stage("CLIP (contrastive, clip part)", _clip_folder, settings, parts["clip"], images["clip"],
                        work / "clip", log)
    lm_folder = stage("LM (pretrained on text part captions)", _lm_folder, settings, parts["text"], work / "lm", log)
    folders = {}
    paper_variance = MacCapConfig().train_noise_variance
    for name, variance in (("noise", paper_variance), ("no_noise", 0.0)):
        hub_config = _hub_config(settings, work, captions_file, clip_folder, lm_folder, variance)
        folders[name] = stage(f"projector, text only, noise variance {variance:g}", train, hub_config,
                              work / f"maccap-{name}", cache_dir=work / "features")
    folders["image"] = stage("projector on image features (upper bound)", _train_on_image_features,
                             _hub_config(settings, work, captions_file, clip_folder, lm_folder, paper_variance),
                             images["text"],
                             text_captions, work / "maccap-image")

    models = {name: MacCapForConditionalGeneration.from_pretrained(folder).eval() for name, folder in folders.items()}
    references = {str(i): captions for i, (_, captions) in enumerate(parts["test"])}
    predictions, table = {}, {}
    t = time.perf_counter()
    # The three models share the demo's CLIP and its image processor: the test images are preprocessed once.
    pixel_values = models["noise"].processor(images=images["test"])["pixel_values"]
    for row, variant, overrides, _ in ROWS:
        model = models[variant]
        captions = _caption(model, model.processor, pixel_values, settings.seed, overrides)
        predictions[row] = {str(i): caption for i, caption in enumerate(captions)}
        metrics, _ = caption_metrics(references, predictions[row], java)
        table[row] = {"BLEU-4": metrics["BLEU-4"], "CIDEr": metrics["CIDEr"]}
    timings["captioning and scoring"] = round(time.perf_counter() - t, 1)
    diagnostics = _diagnostics(models, parts["test"], pixel_values, predictions)
    timings["total"] = round(time.perf_counter() - started, 1)
    results = {
        "settings": dataclasses.asdict(settings),
        "torch_threads": torch.get_num_threads(),
        "metrics": table,
        "metric_scale": "0-1, as pycocoevalcap reports them (x100 for the usual CIDEr figures)",
        "rows": {row: description for row, _, _, description in ROWS},
        "diagnostics": diagnostics,
        "findings": _findings(table, diagnostics, settings),
        "timings_s": timings,
    }
    _write_outputs(output_dir, results, predictions, references, images["test"], settings)
    return results


def _write_outputs(output_dir, results, predictions, references, images, settings):
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (output_dir / "predictions.json").write_text(
        json.dumps({"references": references, "predictions": predictions}, indent=2) + "\n", encoding="utf-8")
    (output_dir / "results.md").write_text(results_markdown(results), encoding="utf-8")
    (output_dir / "contact_sheet.html").write_text(
        contact_sheet(images[:settings.contact_sheet_images], predictions, references), encoding="utf-8")


def results_markdown(results):
    d = results["diagnostics"]
    lines = ["# maccap demo: MacCap on a synthetic world", "",
             f"Seed {results['settings']['seed']}; {results['settings']['test_scenes']} held-out images, "
             f"{results['settings']['captions_per_scene']} reference captions each; metrics from pycocoevalcap "
             f"({results['metric_scale']}).", "",
             "| setting | BLEU-4 | CIDEr | what changes |", "|---|---|---|---|"]
    for row, metrics in results["metrics"].items():
        lines.append(f"| {row} | {metrics['BLEU-4']:.3f} | {metrics['CIDEr']:.3f} | {results['rows'][row]} |")
    lines += ["", "## What the numbers say", ""] + [f"- {finding}" for finding in results["findings"]]
    lines += ["", "## Diagnostics (held-out images; the full method's model unless named)", ""]
    lines += [f"- {label}: {d[key]:.3f}" if isinstance(d[key], float) else f"- {label}: {d[key]}"
              for key, label in DIAGNOSTIC_LABELS.items()]
    lines += ["",
              "Timings (s): " + ", ".join(f"{k} {v:g}" for k, v in results["timings_s"].items()), ""]
    return "\n".join(lines)


def contact_sheet(images, predictions, references):
    """An HTML page: each image (enlarged), the caption of every setting, and its references."""
    cells = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        rows = "".join(f"<tr><th>{html.escape(row)}</th><td>{html.escape(captions[str(i)])}</td></tr>"
                       for row, captions in predictions.items())
        refs = "<br>".join(html.escape(r) for r in references[str(i)])
        cells.append(f'<div class="cell"><img src="data:image/png;base64,{data}" width="128" height="128">'
                     f"<table>{rows}<tr><th>references</th><td>{refs}</td></tr></table></div>")
    return ("<!doctype html><meta charset='utf-8'><title>maccap demo</title><style>"
            "body{font-family:sans-serif} .cell{display:inline-block;vertical-align:top;width:460px;margin:8px}"
            "img{image-rendering:pixelated} th{text-align:left;font-weight:normal;color:#666;padding-right:8px}"
            "</style><h1>maccap demo: held-out images and their captions</h1>" + "".join(cells))


# ---------------------------------------------------------------------------------------------------- CLI
def add_parser(commands):
    demo = commands.add_parser("demo", help="offline end-to-end demo: train CLIP, an LM and MacCap on a synthetic "
                                            "world, then caption held-out images with the paper's ablations")
    demo.add_argument("--output-dir", default="maccap-demo",
                      help="results.md/json, predictions.json, contact_sheet.html and the trained models "
                           "(default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="the world and every training run follow it (default: 0)")
    demo.set_defaults(run=run)


def run(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    results = run_demo(args.output_dir, DemoSettings(seed=args.seed))
    print()
    print(results_markdown(results))
    print(f"written: {Path(args.output_dir) / 'results.md'}, results.json, predictions.json, contact_sheet.html")
    return 0


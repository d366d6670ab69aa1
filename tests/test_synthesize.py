"""`maccap synthesize`: a tiny random diffusers pipeline built from configs renders captions into pairs; empty
captions and defective images are reported and skipped; a killed run resumes to the same images; existing pairs
are read with their bad rows skipped."""

import json
import logging

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_maccap.tools import synthesize as syn
from modeling_maccap.tools.cli import main
from modeling_maccap.tools.errors import MacCapError

from .conftest import random_image

CAPTIONS = ["a red dog on the grass", "", "a blue cat", "   ", "a man with a dog", "a cat on a table", "the dog"]


def test_image_defects():
    good = np.random.default_rng(0).random((8, 8, 3))
    assert syn.image_defect(good) is None
    nan = good.copy()
    nan[2, 3, 1] = np.nan
    assert "not finite" in syn.image_defect(nan)
    assert "flat" in syn.image_defect(np.zeros((8, 8, 3)))
    assert "not an image" in syn.image_defect(np.zeros((8, 8)))
    assert syn.caption_defect("  ") == "empty caption" and syn.caption_defect(None).startswith("caption is not")


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A Stable Diffusion pipeline of random weights, a few thousand parameters, saved as a diffusers folder."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel

    from modeling_maccap.tools.tiny import tiny_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer),
        bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(folder)
    return str(folder)


RENDER = dict(num_inference_steps=2, height=16, width=16, guidance_scale=1.0)


class Corrupting:
    """Wraps a pipeline: the image of `bad_prompt` comes back with NaN pixels; after `stop_after` calls, it raises
    as a killed process would stop."""

    def __init__(self, pipeline, bad_prompt=None, stop_after=None):
        self.pipeline, self.bad_prompt, self.stop_after, self.calls = pipeline, bad_prompt, stop_after, 0

    def __call__(self, prompt, **kwargs):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        out = self.pipeline(prompt=prompt, **kwargs)
        for i, p in enumerate(prompt):
            if p == self.bad_prompt:
                out.images[i][:] = np.nan
        return out


def clip_cosines(clip_dir, images, captions):
    """cos(image, caption) by the CLIP folder, written out here: normalised projected CLS and EOT features."""
    from transformers import CLIPModel, CLIPTokenizer

    from modeling_maccap.tools.tiny import tiny_image_processor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = tiny_image_processor().from_pretrained(clip_dir)(images, return_tensors="pt")["pixel_values"]
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(**tokenizer(captions, padding=True,
                                                                return_tensors="pt")).pooler_output, dim=-1)
    return (image * text).sum(-1).tolist()


def test_synthesize_writes_scored_pairs_and_skips_empty_captions_and_corrupt_images(
        tiny_pipeline_dir, components, tmp_path):
    pipeline = syn.load_text_to_image(tiny_pipeline_dir)
    scorer = syn.ClipScorer(components[0])
    out = tmp_path / "pairs"
    result = syn.synthesize(CAPTIONS, out, Corrupting(pipeline, bad_prompt="a cat on a table"), scorer,
                            batch_size=3, **RENDER)
    assert result == {"pairs": 4, "skipped": 3, "dataset": str(out / "dataset")}
    errors = {r["index"]: r["error"] for r in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors == {1: "empty caption", 3: "empty caption", 5: "generated image not finite (NaN or inf pixels)"}
    pairs = datasets.load_from_disk(str(out / "dataset"))
    assert pairs["caption"] == ["a red dog on the grass", "a blue cat", "a man with a dog", "the dog"]
    assert pairs["index"] == [0, 2, 4, 6]
    images = [row["image"] for row in pairs]
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    assert pairs["clip_score"] == pytest.approx(clip_cosines(components[0], images, list(pairs["caption"])), abs=1e-5)
    # The dataset stands alone (images embedded) and trains: read_pairs finds it in the folder.
    assert syn.read_pairs(str(out))["caption"] == pairs["caption"]
    with pytest.raises(MacCapError, match="already holds pairs"):
        syn.synthesize(CAPTIONS, out, pipeline, scorer, **RENDER)


def test_a_killed_run_resumes_to_the_images_of_an_uninterrupted_one(tiny_pipeline_dir, components, tmp_path):
    pipeline = syn.load_text_to_image(tiny_pipeline_dir)
    scorer = syn.ClipScorer(components[0])
    whole = tmp_path / "whole"
    syn.synthesize(CAPTIONS, whole, pipeline, scorer, batch_size=2, seed=3, **RENDER)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        syn.synthesize(CAPTIONS, part, Corrupting(pipeline, stop_after=1), scorer, batch_size=2, seed=3, **RENDER)
    with open(part / "metadata.jsonl", "a") as file:
        file.write('{"index": 9, "file_na')  # torn by the kill
    done = len((part / "metadata.jsonl").read_text().splitlines()) - 1
    assert 0 < done < 5
    syn.synthesize(CAPTIONS, part, pipeline, scorer, batch_size=3, seed=3, resume=True, **RENDER)
    a, b = datasets.load_from_disk(str(whole / "dataset")), datasets.load_from_disk(str(part / "dataset"))
    assert a["index"] == b["index"] == [0, 2, 4, 5, 6]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    assert b["clip_score"] == pytest.approx(a["clip_score"], abs=1e-6)


def test_existing_pairs_skip_unreadable_images_and_empty_captions(tmp_path, caplog):
    folder = tmp_path / "mine"
    folder.mkdir()
    rows = []
    for i, caption in enumerate(["a dog", "", "a cat", "a man"]):
        random_image(i).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption})
    (folder / "2.png").write_bytes(b"not a png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING):
        pairs = syn.read_pairs(str(folder), caption_column="text")
    assert pairs["caption"] == ["a dog", "a man"] and pairs.column_names == ["image", "caption"]
    assert "2 of 4 rows skipped" in caplog.text and "row 1: empty caption" in caplog.text
    assert "row 2: unreadable image" in caplog.text
    with pytest.raises(MacCapError, match="no column caption"):
        syn.read_pairs(str(folder))


def test_cli_synthesize_and_from_pairs(tiny_pipeline_dir, components, tmp_path, capsys):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(CAPTIONS[:3]))
    out = tmp_path / "out"
    args = ["synthesize", str(captions), "--out", str(out), "--clip", components[0], "--model-id", tiny_pipeline_dir,
            "--size", "16", "--steps", "2", "--guidance-scale", "1.0", "--device", "cpu"]
    assert main(args) == 0
    assert "2 pairs (1 skipped" in capsys.readouterr().out
    assert main(args) == 2  # not without --resume
    assert main(args + ["--resume"]) == 0
    again = tmp_path / "again"
    assert main(["synthesize", "--from-pairs", str(out / "dataset"), "--out", str(again), "--clip", components[0],
                 "--device", "cpu"]) == 0
    scored = datasets.load_from_disk(str(again / "dataset"))
    original = datasets.load_from_disk(str(out / "dataset"))
    assert scored["caption"] == original["caption"]
    assert scored["clip_score"] == pytest.approx(original["clip_score"], abs=1e-5)
    assert main(["synthesize", str(captions), "--out", str(tmp_path / "x"), "--clip", components[0],
                 "--model-id", str(tmp_path / "no-such-pipeline"), "--device", "cpu"]) == 2

"""`maccap train --recipe supervised --pairs P`: pairs from every source, bad rows reported by name and skipped, the
projector learns each image's own caption, the mixed loss is the weighted sum, and the folder loads as any other."""

import io
import json
import logging
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, pipeline

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.tools import recipes
from modeling_maccap.tools.cli import main
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.hub import model_card, stage
from modeling_maccap.tools.hub_config import load_hub_config
from modeling_maccap.tools.pairs import load_image_folder, load_pairs
from modeling_maccap.tools.tiny import TINY_MACCAP

from .test_training import write_hub_config

CAPTIONS = ["a red dog", "the blue cat", "a man on the grass", "a photo of a table"]


def write_images(folder, count, side=40):
    """`count` PNG images of one flat colour each (far apart for any CLIP): 0.png, 1.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = np.random.default_rng(0).integers(0, 256, (count, 3))
    for i, colour in enumerate(colours):
        Image.fromarray(np.broadcast_to(colour.astype(np.uint8), (side, side, 3)).copy()).save(folder / f"{i}.png")
    return [folder / f"{i}.png" for i in range(count)]


@pytest.fixture
def pair_rows(tmp_path):
    """4 good pairs, then a broken image, an empty caption and a missing image: rows as JSON records."""
    write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    rows = [{"image": f"imgs/{i}.png", "caption": c} for i, c in enumerate(CAPTIONS)]
    rows += [{"image": "imgs/broken.png", "caption": "a cat"}, {"image": "imgs/1.png", "caption": "  "},
             {"image": "imgs/missing.png", "caption": "a dog"}]
    return rows


def test_pairs_from_a_file_a_folder_and_a_dataset_skip_bad_rows_by_name(tmp_path, pair_rows, caplog, processor):
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pair_rows))
    csv = "file_name,text\n" + "".join(f"{r['image'][5:]},{r['caption']}\n" for r in pair_rows)
    (tmp_path / "imgs" / "captions.csv").write_text(csv)
    images = [Image.open(tmp_path / r["image"]).convert("RGB") if i < 4 else None for i, r in enumerate(pair_rows)]
    hub_style = datasets.Dataset.from_dict({"img": [im for im in images if im is not None],
                                            "caption": CAPTIONS[:3] + [""]}).cast_column("img", datasets.Image())
    hub_style.save_to_disk(str(tmp_path / "saved"))

    with caplog.at_level(logging.WARNING):
        from_file = load_pairs(tmp_path / "pairs.jsonl")
    assert from_file["caption"] == CAPTIONS
    assert from_file["name"] == [str(tmp_path / "imgs" / f"{i}.png") for i in range(4)]
    for name in ("broken.png", "missing.png"):
        assert "skipped 2 pairs whose image cannot be read" in caplog.text and name in caplog.text
    assert f"skipped 1 pairs with an empty caption: {tmp_path / 'imgs' / '1.png'}" in caplog.text

    from_folder = load_pairs(tmp_path / "imgs", caption_column="text")  # file_name: the imagefolder convention
    assert from_folder["caption"] == CAPTIONS and from_folder["name"] == from_file["name"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        from_dataset = load_pairs(tmp_path / "saved", image_column="img")
    assert from_dataset["caption"] == CAPTIONS[:3]
    assert "skipped 1 pairs with an empty caption: row 3" in caplog.text
    for row, path in zip(from_dataset, from_file["name"]):  # the bytes kept are the image's own
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))),
                              np.asarray(Image.open(path).convert("RGB")))
    # and the recipe's collator turns them into the pixel values of the images themselves
    collator = recipes.RecipeCollator(processor, pairs=from_dataset)
    batch = collator([{"source": 0, "index": 2}, {"source": 0, "index": 0}])["pairs"]
    expected = processor(images=[Image.open(from_file["name"][2]), Image.open(from_file["name"][0])])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"])
    assert batch["input_ids"].tolist() == processor.caption_lm_inputs([CAPTIONS[2], CAPTIONS[0]])["input_ids"].tolist()


def test_a_missing_column_is_one_error_naming_it(tmp_path, pair_rows):
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pair_rows))
    with pytest.raises(MacCapError, match="has no caption column 'text' \\(columns: image, caption\\)"):
        load_pairs(tmp_path / "pairs.jsonl", caption_column="text")
    with pytest.raises(MacCapError, match="has no image column 'picture'"):
        load_pairs(tmp_path / "pairs.jsonl", image_column="picture")
    with pytest.raises(MacCapError, match="no captions file"):
        load_pairs(tmp_path / "imgs")


def test_an_unreadable_image_in_a_folder_is_reported_and_skipped(tmp_path, caplog):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        folder = load_image_folder(tmp_path / "imgs")
    assert folder["name"] == [str(tmp_path / "imgs" / f"{i}.png") for i in range(3)]
    assert f"skipped 1 images that cannot be read: {tmp_path / 'imgs' / 'broken.jpg'}" in caplog.text


def projector_loss(model, image, caption):
    """Teacher-forced caption loss given an image (noise seeded per image, as `generate` draws it)."""
    processor = model.processor
    pixel_values = processor(images=[Image.open(image)])["pixel_values"]
    with torch.no_grad():
        return model(**processor.caption_lm_inputs([caption]), pixel_values=pixel_values).loss.item()


def lm_without_dropout(lm_dir, folder):
    """A copy of the tiny LM folder with GPT-2's three dropouts at 0. Training runs the frozen LM in train mode, as
    the reference does; with the tiny LM's wide init, its dropout alone moves the loss by several nats a step, which
    would drown what this test measures: what the projector learned."""
    shutil.copytree(lm_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_the_projector_learns_each_image_s_own_caption_and_the_folder_loads(tmp_path, components):
    """Two images, two captions, the images' own features as the condition: after training, each image makes its
    own caption likelier than the other's, by more than a nat; only the projector moved; AutoModel and the pipeline
    load the folder."""
    clip, lm = components[0], lm_without_dropout(components[1], tmp_path / "lm")
    paths = write_images(tmp_path / "imgs", 2)
    pairs = [{"image": str(p), "caption": c} for p, c in zip(paths, CAPTIONS[:2])]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    hub_config = write_hub_config(tmp_path, eval_strategy="no", per_device_train_batch_size=2, learning_rate=3e-3,
                                  warmup_steps=0, maccap={"inference_noise_variance": 1e-4, "aligner_dropout": 0.0})
    out = tmp_path / "out"
    assert main(["train", "--hub-config", str(hub_config), "--clip", clip, "--lm", lm, "--output-dir", str(out),
                 "--recipe", "supervised", "--pairs", str(tmp_path / "pairs.jsonl"), "--max-steps", "150"]) == 0

    model = MacCapForConditionalGeneration.from_pretrained(out).eval()
    for own, other in ((0, 1), (1, 0)):  # (margins of 2.2 to 5.5 nats over training seeds 1, 2, 3 and 42)
        assert projector_loss(model, paths[own], CAPTIONS[own]) + 1.0 < projector_loss(model, paths[own],
                                                                                        CAPTIONS[other])
    torch.manual_seed(7)
    initial = MacCapForConditionalGeneration.from_pretrained_components(clip=clip, lm=lm, **TINY_MACCAP).state_dict()
    for name, value in load_file(out / "model.safetensors").items():
        assert torch.equal(value, initial[name]) != name.startswith("projector."), name
    assert json.loads((out / "recipe.json").read_text())["pairs"] == str(tmp_path / "pairs.jsonl")
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    # Staged with a hub config that names no recipe, the card still says which recipe and data made it.
    staged = stage(out, load_hub_config(hub_config), tmp_path / "staging")
    card = (staged / "README.md").read_text()
    assert "Recipe `supervised`" in card and "labelled (image, caption) pairs from `pairs.jsonl`" in card

    remote = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "MacCapForConditionalGeneration"
    captioner = pipeline("image-to-text", model=str(out), trust_remote_code=True)
    assert isinstance(captioner(str(paths[0]))[0]["generated_text"], str)


def test_the_mixed_loss_is_the_weighted_sum_of_the_two_objectives(tmp_path, components, processor):
    """compute_loss on a batch of 2 pairs and 3 captions = 0.7 CE(pairs | their images) + 0.4 CE(captions | their
    CLIP text embeddings), each computed here by the model's forward with the same noise draws."""
    paths = write_images(tmp_path / "imgs", 2)
    pairs = datasets.Dataset.from_dict({"name": [str(p) for p in paths], "image": [str(p) for p in paths],
                                        "caption": CAPTIONS[:2]})
    captions = datasets.Dataset.from_dict({"caption": CAPTIONS[1:]})
    recipe = recipes.RecipeSettings(name="supervised", pairs="unused", supervised_weight=0.7, text_weight=0.4)
    collator = recipes.RecipeCollator(processor, pairs=pairs, captions=captions)
    batch = collator([{"source": 0, "index": 1}, {"source": 1, "index": 2}, {"source": 0, "index": 0},
                      {"source": 1, "index": 0}, {"source": 1, "index": 1}])
    model = MacCapForConditionalGeneration.from_pretrained_components(
        clip=components[0], lm=components[1], **{**TINY_MACCAP, "aligner_dropout": 0.0})
    model.processor = processor
    from transformers import TrainingArguments

    trainer = recipes._trainer_class()(model=model, args=TrainingArguments(str(tmp_path / "t"), report_to="none",
                                                                           use_cpu=True),
                                       train_dataset=recipes.recipe_rows({"pairs": 2, "captions": 3}),
                                       data_collator=collator, processing_class=processor, recipe=recipe)
    torch.manual_seed(3)
    loss = trainer.compute_loss(model, batch)

    torch.manual_seed(3)
    images = processor(images=[Image.open(p) for p in (paths[1], paths[0])])["pixel_values"]
    pair_loss = model(**processor.caption_lm_inputs([CAPTIONS[1], CAPTIONS[0]]), pixel_values=images,
                      noise_seed=None).loss
    text_loss = model(**processor(text=[CAPTIONS[3], CAPTIONS[1], CAPTIONS[2]])).loss  # captions rows 2, 0, 1
    torch.testing.assert_close(loss, 0.7 * pair_loss + 0.4 * text_loss)


def test_the_hub_config_names_the_recipe_and_the_card_says_it(tmp_path, pair_rows):
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pair_rows))
    path = write_hub_config(tmp_path, eval_strategy="no")
    data = json.loads(path.read_text())
    data["training"]["recipe"] = {"name": "clip-reward", "images": "imgs", "pairs": "pairs.jsonl",
                                  "baseline": "mean", "kl_weight": 0.05, "num_samples": 3}
    path.write_text(json.dumps(data))
    hub_config = load_hub_config(path)
    card = str(model_card(hub_config, "me/tiny"))
    assert "Recipe `clip-reward`" in card and "unlabelled images from `imgs`" in card
    assert "3 captions sampled per image" in card and "KL weight to the starting model 0.05" in card
    assert "pairs of `pairs.jsonl` (weight 1.0)" in card and "the mean reward of the image's other samples" in card

    data["training"]["recipe"] = {"name": "clip-reward", "baseline": "best"}
    path.write_text(json.dumps(data))
    with pytest.raises(MacCapError, match="training.recipe.baseline"):
        load_hub_config(path)
    data["training"]["recipe"] = {"name": "supervised"}
    path.write_text(json.dumps(data))
    with pytest.raises(MacCapError, match="training.recipe: the supervised recipe needs pairs"):
        load_hub_config(path)


def test_train_runs_the_recipe_its_hub_config_names(tmp_path, components, pair_rows):
    """`training.train` (what `maccap train` runs without --recipe) follows training.recipe: 4 pairs, batch 2,
    2 steps, one epoch over the pairs; the hub config's relative paths are taken from its folder."""
    from modeling_maccap.tools.training import train

    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pair_rows))
    path = write_hub_config(tmp_path, eval_strategy="no", per_device_train_batch_size=2)
    data = json.loads(path.read_text())
    data["training"]["recipe"] = {"name": "supervised", "pairs": "pairs.jsonl"}
    path.write_text(json.dumps(data))
    out = train(path, tmp_path / "out", clip=components[0], lm=components[1], max_steps=2)
    text_only = tmp_path / "text-only"  # unless the command line says --recipe text
    assert main(["train", "--hub-config", str(path), "--clip", components[0], "--lm", components[1], "--output-dir",
                 str(text_only), "--max-steps", "1", "--recipe", "text"]) == 0
    assert not (text_only / "recipe.json").exists()
    assert json.loads((out / "recipe.json").read_text())["pairs"] == str(tmp_path / "pairs.jsonl")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"][-1]["epoch"] == 1.0
    assert all("supervised" in entry for entry in state["log_history"] if "loss" in entry)


def test_a_pairs_dataset_split_and_init_from(tmp_path, components, checkpoint, pair_rows):
    """pairs_split picks a split of a saved DatasetDict; --init-from starts from a checkpoint's weights (at learning
    rate 0 the output holds exactly them)."""
    good = [Image.open(tmp_path / r["image"]).convert("RGB") for r in pair_rows[:4]]
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": good[:1], "caption": CAPTIONS[:1]}),
        "validation": datasets.Dataset.from_dict({"image": good[1:], "caption": CAPTIONS[1:]}),
    }).cast_column("image", datasets.Image())
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_pairs(tmp_path / "splits", split="validation")["caption"] == CAPTIONS[1:]
    with pytest.raises(MacCapError, match="no split 'test'"):
        load_pairs(tmp_path / "splits", split="test")

    hub_config = write_hub_config(tmp_path, eval_strategy="no", per_device_train_batch_size=2, learning_rate=0.0,
                                  warmup_steps=0)
    out = tmp_path / "out"
    assert main(["train", "--hub-config", str(hub_config), "--clip", components[0], "--lm", components[1],
                 "--output-dir", str(out), "--recipe", "supervised", "--pairs", str(tmp_path / "splits"),
                 "--recipe-set", "pairs_split=validation", "--init-from", str(checkpoint), "--max-steps", "1"]) == 0
    expected = load_file(checkpoint / "model.safetensors")
    for name, value in load_file(out / "model.safetensors").items():
        assert torch.equal(value, expected[name]), name


def test_an_unknown_recipe_setting_is_one_error(tmp_path, components, capsys):
    hub_config = write_hub_config(tmp_path, eval_strategy="no")
    assert main(["train", "--hub-config", str(hub_config), "--output-dir", str(tmp_path / "out"), "--recipe",
                 "clip-reward", "--images", str(tmp_path), "--recipe-set", "kl_wieght=0.1"]) == 2
    assert "--recipe-set: unknown setting(s) kl_wieght; the settings are" in capsys.readouterr().err
    assert main(["train", "--hub-config", str(hub_config), "--output-dir", str(tmp_path / "out"), "--pairs",
                 str(tmp_path)]) == 2
    assert "--pairs / --images need --recipe supervised or clip-reward" in capsys.readouterr().err
    with_eval = write_hub_config(tmp_path)  # eval_strategy "epoch"
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a dog"}))
    assert main(["train", "--hub-config", str(with_eval), "--output-dir", str(tmp_path / "out"), "--recipe",
                 "supervised", "--pairs", str(tmp_path / "pairs.jsonl")]) == 2
    assert "the supervised recipe has no eval loss" in capsys.readouterr().err

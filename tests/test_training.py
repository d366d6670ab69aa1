"""`maccap train --hub-config F`: the variant's settings reach the Trainer, only the projector learns, and the
output folder is a complete checkpoint (no pickles)."""

import dataclasses
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.tools.cli import main
from modeling_maccap.tools.hub_config import load_hub_config
from modeling_maccap.tools.tiny import TINY_MACCAP, build_tiny_components
from modeling_maccap.tools import training
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.training import (FEATURE_COLUMN, CaptionCollator, cache_text_features, load_captions,
                                            split_corpus, train)

from .test_hub_config import HUB_CONFIGS
from .test_remote_code import REMOTE_FILES

CAPTIONS = ["a dog on the grass", "a red cat", "", "   ", "the man with a table", "a blue photo of a dog"]


TINY_ARGUMENTS = dict(learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="cosine_warmup_with_min_lr",
                      lr_scheduler_kwargs={"min_lr_rate": 0.1, "warmup_lr_rate": 0.01}, per_device_train_batch_size=4,
                      num_train_epochs=2, logging_steps=1, eval_strategy="epoch", save_strategy="no", seed=7,
                      report_to="none")


def write_hub_config(folder, captions=CAPTIONS * 4, maccap=None, **arguments):
    """A hub config for the tiny components in `folder`, its captions in captions.json beside it: by default
    4 x 6 captions (8 empty), 25% held out, batch 4, 2 epochs, 12 LM tokens at most."""
    (folder / "captions.json").write_text(json.dumps(captions))
    path = folder / "tiny.json"
    path.write_text(json.dumps({
        "hub": {"repo_id": "me/maccap-tiny", "model_name": "tiny MacCap", "license": "mit"},
        "architecture": {"components": {"clip": "tiny-clip", "lm": "tiny-lm"},
                         "maccap": {**TINY_MACCAP, **(maccap or {})}},
        "corpus": {"file": "captions.json", "validation_fraction": 0.25},
        "training": {"max_caption_length": 12, "arguments": {**TINY_ARGUMENTS, **arguments}},
    }))
    return path


@pytest.fixture
def tiny_hub_config(tmp_path):
    return write_hub_config(tmp_path)


def expected_lr(step, peak=1e-3, warmup=2, total=6, start=0.01, floor=0.1):
    """method.md's schedule written out: linear warm-up from start*peak, then cosine down to floor*peak."""
    if step < warmup:
        return peak * (start + (1 - start) * step / (warmup - 1))
    progress = (step - warmup + 1) / (total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_train_command_follows_the_hub_config(tiny_hub_config, components, tmp_path, caplog):
    out = tmp_path / "trained"
    torch.manual_seed(7)  # the hub config's seed, which `maccap train` sets before building the projector
    initial = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=components[1],
                                                                        **TINY_MACCAP)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--hub-config", str(tiny_hub_config), "--clip", components[0], "--lm", components[1],
                     "--output-dir", str(out)]) == 0
    assert "16 captions, 8 empty or non-string dropped" in caplog.text

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 * math.ceil(12 / 4)  # 16 kept, 4 held out, batch 4, 2 epochs
    lrs = [entry["learning_rate"] for entry in state["log_history"] if "loss" in entry]
    assert lrs == pytest.approx([expected_lr(step) for step in range(6)], rel=1e-6)
    assert len([entry for entry in state["log_history"] if "eval_loss" in entry]) == 2

    trained = load_file(out / "model.safetensors")
    before = initial.state_dict()
    for name, value in trained.items():
        if name.startswith("projector."):
            continue
        assert torch.equal(value, before[name]), f"frozen weight {name} changed"
    changed = [n for n, v in trained.items() if n.startswith("projector.") and not torch.equal(v, before[n])]
    assert len(changed) == len([n for n in trained if n.startswith("projector.")])

    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")) and not list(out.glob("*.pth"))
    assert json.loads((out / "training_args.json").read_text())["seed"] == 7
    model = MacCapForConditionalGeneration.from_pretrained(out)
    assert model.processor.max_caption_length == 12
    assert set(REMOTE_FILES) <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.stem)
def test_each_published_variant_trains_with_tiny_stand_ins(path, components, tmp_path):
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS * 2))
    hub = load_hub_config(path)
    hub = dataclasses.replace(hub, maccap={**hub.maccap, **TINY_MACCAP},
                              corpus={"file": str(tmp_path / "captions.txt"), "validation_fraction": 0.5},
                              training_arguments={**hub.training_arguments, "per_device_train_batch_size": 2,
                                                  "logging_steps": 1})
    out = train(hub, tmp_path / "out", clip=components[0], lm=components[1], max_steps=2)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["log_history"][0]["learning_rate"] == pytest.approx(1e-4 * 0.01)  # warm-up starts at 1% of lr


def test_eval_strategy_without_held_out_captions_is_refused(tiny_hub_config, components, tmp_path, capsys):
    assert main(["train", "--hub-config", str(tiny_hub_config), "--clip", components[0], "--lm", components[1],
                 "--captions", str(tiny_hub_config.parent / "captions.json"), "--output-dir", str(tmp_path / "x")]) == 2
    assert "eval_strategy is 'epoch' but the corpus has no held-out part" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, column, expected", [
    ("c.json", json.dumps(["a cat", "", 3, None, " a dog "]), None, ["a cat", "a dog"]),
    ("c.json", json.dumps([{"text": ["a cat"]}, {"text": ["x", "y ", ""]}]), "text", ["a cat", "x", "y"]),
    ("c.jsonl", '{"caption": "a cat"}\n{"caption": ""}\n', None, ["a cat"]),
    ("c.csv", "id,sentence\n1,a cat\n2,\n3,a dog\n", "sentence", ["a cat", "a dog"]),
    ("c.txt", "a cat\n\na dog\n", None, ["a cat", "a dog"]),
])
def test_captions_are_read_from_every_format_and_cleaned(tmp_path, name, content, column, expected):
    (tmp_path / name).write_text(content)
    spec = {"file": str(tmp_path / name), **({"column": column} if column else {})}
    assert load_captions(spec)["caption"] == expected


def test_caption_errors_name_the_file_and_the_column(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n1,a cat\n")
    with pytest.raises(MacCapError, match=r"c.csv has no column 'caption' \(columns: id, text\)"):
        load_captions({"file": str(tmp_path / "c.csv")})
    with pytest.raises(MacCapError, match="missing.json does not exist"):
        load_captions({"file": str(tmp_path / "missing.json")})
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(MacCapError, match="cannot read caption file .*bad.json"):
        load_captions({"file": str(tmp_path / "bad.json")})
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(MacCapError, match="no usable caption"):
        load_captions({"file": str(tmp_path / "empty.txt")})


def test_components_that_cannot_be_loaded_are_named(tiny_hub_config, components, tmp_path, capsys):
    assert main(["train", "--hub-config", str(tiny_hub_config), "--clip", str(tmp_path / "no-clip"), "--lm",
                 components[1], "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_hub_config}: architecture.components: cannot load CLIP '{tmp_path / 'no-clip'}'" in err


# ------------------------------------------------------------------------------------------ CLIP feature cache
@pytest.fixture
def text_tower_rows(monkeypatch):
    """Counts the caption rows the CLIP text tower encodes, wherever it is called from."""
    from transformers.models.clip import modeling_clip

    rows = []
    forward = modeling_clip.CLIPTextModel.forward

    def counted(self, input_ids=None, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(modeling_clip.CLIPTextModel, "forward", counted)
    return rows


def train_tiny(hub_config, components, out, *extra):
    assert main(["train", "--hub-config", str(hub_config), "--clip", components[0], "--lm", components[1],
                 "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "trainer_state.json").read_text())


def test_clip_text_features_are_computed_once_per_corpus_and_clip(tiny_hub_config, components, tmp_path,
                                                                  text_tower_rows, monkeypatch):
    monkeypatch.setattr(training, "default_cache_dir", lambda: tmp_path / "cache")  # not the session's cache
    train_tiny(tiny_hub_config, components, tmp_path / "run1")  # 2 epochs, 2 evaluations
    assert sum(text_tower_rows) == 16  # each of the 12 training and 4 held-out captions once

    text_tower_rows.clear()
    train_tiny(tiny_hub_config, components, tmp_path / "run2")
    assert text_tower_rows == []  # a rerun reads the cache

    (tmp_path / "same.txt").write_text("\n".join(CAPTIONS * 4))  # the same corpus from another file format
    train_tiny(tiny_hub_config, components, tmp_path / "run3", "--captions", str(tmp_path / "same.txt"),
               "--validation-fraction", "0.25")
    assert text_tower_rows == []

    other_clip, _ = build_tiny_components(tmp_path / "other", seed=1)  # another CLIP: its own features
    train_tiny(tiny_hub_config, (other_clip, components[1]), tmp_path / "run4")
    assert sum(text_tower_rows) == 16

    text_tower_rows.clear()
    state = train_tiny(tiny_hub_config, components, tmp_path / "run5", "--no-feature-cache")
    assert sum(text_tower_rows) == state["global_step"] * 4 + 2 * 4  # every step's batch and both evaluations


def test_cached_features_are_the_clip_text_embeddings_and_give_the_same_loss(make_model, tmp_path):
    import datasets

    model = make_model().train()
    processor = model.processor
    captions = datasets.Dataset.from_dict({"caption": ["a dog on the grass", "a red cat", "the man, with a table"]})
    cached = cache_text_features(captions, model, processor, tmp_path)
    for caption, feature in zip(captions["caption"], cached[FEATURE_COLUMN]):
        alone = processor.clip_tokenizer(caption, return_tensors="pt")  # unpadded, one caption at a time
        expected = model.clip.get_text_features(**alone).pooler_output[0]
        torch.testing.assert_close(feature, expected / expected.norm(), rtol=0, atol=1e-5)

    batch = CaptionCollator(processor)([cached[i] for i in range(3)])
    assert FEATURE_COLUMN in batch and "clip_input_ids" not in batch
    encoded = processor(text=list(captions["caption"]))
    torch.manual_seed(0)
    loss_cached = model(**batch).loss
    torch.manual_seed(0)  # the same noise draw and dropout
    loss_encoded = model(**encoded).loss
    torch.testing.assert_close(loss_cached, loss_encoded, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(**batch).loss, loss_cached)  # noise is fresh at every step


# ------------------------------------------------------------------------------------------ token accuracy
def accuracy(model, captions):
    """Next-token accuracy over the scored caption tokens, computed here from the logits."""
    batch = model.processor(text=captions)
    with torch.no_grad():
        logits = model(**batch).logits
    predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    scored = target != -100
    return ((predicted == target) & scored).sum().item() / scored.sum().item()


def test_token_accuracy_is_logged_for_training_and_evaluation(tmp_path, components):
    """Without noise or dropout (the projector's and the LM's) the objective is deterministic, so the logged accuracies can be recomputed from
    the saved weights: the last step trains on the weights of the checkpoint before it, and the last evaluation
    sees the final ones. The LM is fine-tuned fast on a tiny corpus, so that the accuracy moves off zero."""
    captions = [f"a {colour} {thing} on the {place}" for colour in ("red", "blue") for thing in ("cat", "dog", "car")
                for place in ("grass", "table")]
    hub_config = write_hub_config(tmp_path, captions, maccap={"train_noise_variance": 0.0, "aligner_dropout": 0.0},
                                  learning_rate=1e-2, per_device_train_batch_size=18, num_train_epochs=12,
                                  save_strategy="steps", save_steps=11)
    lm = tmp_path / "lm-without-dropout"
    AutoModelForCausalLM.from_pretrained(components[1], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(lm)
    AutoTokenizer.from_pretrained(components[1]).save_pretrained(lm)
    state = train_tiny(hub_config, (components[0], str(lm)), tmp_path / "out", "--finetune-lm")
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    eval_logs = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert len(train_logs) == 12 and len(eval_logs) == 12
    assert train_logs[-1]["token_accuracy"] > 0.2 and eval_logs[-1]["eval_token_accuracy"] > 0.2

    train_set, eval_set = split_corpus(load_hub_config(hub_config))
    before_last = MacCapForConditionalGeneration.from_pretrained(tmp_path / "out" / "checkpoint-11").train()
    assert train_logs[-1]["token_accuracy"] == pytest.approx(accuracy(before_last, list(train_set["caption"])))
    final = MacCapForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert eval_logs[-1]["eval_token_accuracy"] == pytest.approx(accuracy(final, list(eval_set["caption"])))


# ------------------------------------------------------------------------------------------ options
def test_finetune_lm_trains_the_lm_and_leaves_clip_frozen(tiny_hub_config, components, tmp_path):
    train_tiny(tiny_hub_config, components, tmp_path / "out", "--finetune-lm", "--max-steps", "2")
    trained = load_file(tmp_path / "out" / "model.safetensors")
    initial = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=components[1],
                                                                        **TINY_MACCAP).state_dict()
    assert all(torch.equal(v, initial[n]) for n, v in trained.items() if n.startswith("clip."))
    lm = [n for n in trained if n.startswith("language_model.")]
    assert lm and all(not torch.equal(trained[n], initial[n]) for n in lm if "ln_" not in n and ".bias" not in n)


def test_gradient_accumulation_and_argument_overrides(tiny_hub_config, components, tmp_path, capsys):
    state = train_tiny(tiny_hub_config, components, tmp_path / "out", "--set", "per_device_train_batch_size=2",
                       "--set", "gradient_accumulation_steps=3", "--set", "eval_strategy=no")
    assert state["global_step"] == 2 * math.ceil(12 / (2 * 3))
    assert state["train_batch_size"] == 2
    assert main(["train", "--hub-config", str(tiny_hub_config), "--set", "batch=3"]) == 2
    assert "--set: training.arguments.batch: not a transformers.TrainingArguments field" in capsys.readouterr().err
    assert main(["train", "--hub-config", str(tiny_hub_config), "--set", "output_dir=x"]) == 2
    assert "training.arguments.output_dir: set by maccap train" in capsys.readouterr().err
    assert main(["train", "--hub-config", str(tiny_hub_config), "--set", "seed"]) == 2
    assert "--set 'seed': expected NAME=VALUE" in capsys.readouterr().err


def test_overlong_captions_are_dropped_and_counted(tmp_path, components, caplog):
    long = "a " + " ".join(["very"] * 11) + " long caption"  # more than 12 LM tokens
    hub_config = write_hub_config(tmp_path, ["a red cat", "a dog", long, "", long, "a car"] * 2, eval_strategy="no")
    with caplog.at_level(logging.WARNING):
        state = train_tiny(hub_config, components, tmp_path / "out")
    assert "6 captions, 2 empty or non-string dropped, 4 longer than 12 tokens dropped" in caplog.text
    assert state["global_step"] == 2 * math.ceil(4 / 4)  # 6 kept, 2 held out


def test_a_hub_dataset_corpus_with_a_validation_split(tmp_path, components):
    import datasets

    repo = tmp_path / "captions-repo"  # laid out as a dataset repo; datasets reads a Hub id the same way
    datasets.Dataset.from_dict({"text": ["a red cat", "a blue dog", "", "a car"] * 2}).to_parquet(
        str(repo / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"text": ["a green cat", "a dog"]}).to_parquet(
        str(repo / "data" / "validation-00000-of-00001.parquet"))
    hub_config = dataclasses.replace(load_hub_config(write_hub_config(tmp_path)), corpus={
        "hub_id": str(repo), "split": "train", "column": "text", "validation_split": "validation"})
    train_set, eval_set = split_corpus(hub_config)
    assert train_set["caption"] == ["a red cat", "a blue dog", "a car"] * 2
    assert eval_set["caption"] == ["a green cat", "a dog"]
    state = json.loads((train(hub_config, tmp_path / "out", clip=components[0], lm=components[1]) /
                        "trainer_state.json").read_text())
    assert state["global_step"] == 2 * math.ceil(6 / 4)


def test_an_existing_run_is_resumed_only_when_asked(tiny_hub_config, components, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--hub-config", str(tiny_hub_config), "--clip", components[0], "--lm", components[1],
            "--output-dir", str(out)]
    assert main([*args, "--resume"]) == 2
    assert f"--resume: {out} holds no checkpoint-N folder to resume from" in capsys.readouterr().err
    (out / "checkpoint-3").mkdir(parents=True)
    assert main(args) == 2
    assert "already holds checkpoint-3: pass --resume to continue" in capsys.readouterr().err

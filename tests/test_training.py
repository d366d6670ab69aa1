"""`maccap train --hub-config F`: the variant's settings reach the Trainer, only the projector learns, and the
output folder is a complete checkpoint (no pickles)."""

import dataclasses
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.cli import main
from modeling_maccap.hub_config import load_hub_config
from modeling_maccap.tiny import TINY_MACCAP
from modeling_maccap.training import CaptionDataError, load_captions, train

from .test_hub_config import HUB_CONFIGS, read

CAPTIONS = ["a dog on the grass", "a red cat", "", "   ", "the man with a table", "a blue photo of a dog"]


@pytest.fixture
def tiny_hub_config(tmp_path):
    """A hub config for the tiny components: 4 x 6 captions (8 empty), 25% held out, batch 4, 2 epochs."""
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS * 4))
    maccap = {**read(HUB_CONFIGS[0])["maccap"], **TINY_MACCAP}
    arguments = dict(learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="cosine_warmup_with_min_lr",
                     lr_scheduler_kwargs={"min_lr_rate": 0.1, "warmup_lr_rate": 0.01}, per_device_train_batch_size=4,
                     num_train_epochs=2, logging_steps=1, eval_strategy="epoch", save_strategy="no", seed=7,
                     report_to="none")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({
        "repo_id": "me/maccap-tiny", "model_name": "tiny MacCap", "license": "mit",
        "components": {"clip": "tiny-clip", "lm": "tiny-lm"}, "maccap": maccap,
        "dataset": {"file": "captions.json", "validation_fraction": 0.25},
        "training": {"max_caption_length": 12, "arguments": arguments},
    }))
    return path


def expected_lr(step, peak=1e-3, warmup=2, total=6, start=0.01, floor=0.1):
    """method.md's schedule written out: linear warm-up from start*peak, then cosine down to floor*peak."""
    if step < warmup:
        return peak * (start + (1 - start) * step / (warmup - 1))
    progress = (step - warmup + 1) / (total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_train_command_follows_the_hub_config(tiny_hub_config, components, tmp_path, caplog):
    out = tmp_path / "trained"
    torch.manual_seed(0)
    initial = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=components[1],
                                                                        **TINY_MACCAP)
    torch.manual_seed(0)  # the same projector initialisation inside `maccap train`
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
    assert {"modeling_maccap.py", "configuration_maccap.py", "processing_maccap.py", "pipeline_maccap.py"} <= {
        p.name for p in out.iterdir()}


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.stem)
def test_each_published_variant_trains_with_tiny_stand_ins(path, components, tmp_path):
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS * 2))
    hub = load_hub_config(path)
    hub = dataclasses.replace(hub, maccap={**hub.maccap, **TINY_MACCAP},
                              dataset={"file": str(tmp_path / "captions.txt"), "validation_fraction": 0.5},
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
    with pytest.raises(CaptionDataError, match=r"c.csv has no column 'caption' \(columns: id, text\)"):
        load_captions({"file": str(tmp_path / "c.csv")})
    with pytest.raises(CaptionDataError, match="missing.json does not exist"):
        load_captions({"file": str(tmp_path / "missing.json")})
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(CaptionDataError, match="cannot read caption file .*bad.json"):
        load_captions({"file": str(tmp_path / "bad.json")})
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CaptionDataError, match="no usable caption"):
        load_captions({"file": str(tmp_path / "empty.txt")})


def test_components_that_cannot_be_loaded_are_named(tiny_hub_config, components, tmp_path, capsys):
    assert main(["train", "--hub-config", str(tiny_hub_config), "--clip", str(tmp_path / "no-clip"), "--lm",
                 components[1], "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_hub_config}: components: cannot load CLIP '{tmp_path / 'no-clip'}'" in err

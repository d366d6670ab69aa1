"""The supervised and clip-reward recipes in processes of their own: a run killed with SIGKILL and resumed ends
where an uninterrupted run ends, with no batch lost or repeated, in a folder that loads as remote code; two
processes under torchrun see every row once per epoch, keep the same weights at every step (their gradients are
averaged) and take the single-process step count."""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from modeling_maccap import MacCapForConditionalGeneration

from . import test_training_runs as training_runs
from .test_remote_code import fresh_process
from .test_supervised import CAPTIONS, write_images
from .test_training_runs import batches, process_groups_left_up
from .test_training import write_hub_config

WORKER = Path(__file__).parent / "recipe_worker.py"


def recipe_arguments(tmp_path, recipe):
    """12 images (and for supervised 12 pairs of them); the clip-reward run also mixes in the 12 pairs (weight
    0.5) and guards with a KL (weight 0.1): 2 samples per image, the mean baseline, 4 new tokens."""
    paths = write_images(tmp_path / "imgs", 12)
    (tmp_path / "pairs.jsonl").write_text("\n".join(
        json.dumps({"image": str(p), "caption": CAPTIONS[i % 4]}) for i, p in enumerate(paths)))
    if recipe == "supervised":
        return ["--recipe", "supervised", "--pairs", str(tmp_path / "pairs.jsonl")], 12
    return ["--recipe", "clip-reward", "--images", str(tmp_path / "imgs"), "--recipe-set", "num_samples=2",
            "--recipe-set", "baseline=mean", "--recipe-set", "kl_weight=0.1", "--recipe-set", "max_new_tokens=4",
            "--pairs", str(tmp_path / "pairs.jsonl"), "--recipe-set", "supervised_weight=0.5"], 24


def run_worker(tmp_path, hub_config, components, out, log, extra, launcher=(), env=None):
    return training_runs.run_worker(tmp_path, hub_config, components, out, log, launcher, env, *extra, worker=WORKER)


def rows(batch_list):
    """Every row a list of batches holds, as sorted (part, row) pairs; token rows without the batch's right padding
    (pad = EOS = BOS = 0 here)."""
    def unpadded(row):
        return row if not isinstance(row, list) else row[: max(i for i, token in enumerate(row) if token != 0) + 1]

    return sorted((part, json.dumps(unpadded(row))) for batch in batch_list for part, values in batch.items()
                  if part != "projector_sum" for row in values)


def row_count(batch_list):
    return sum(len(values) for batch in batch_list for part, values in batch.items()
               if part in ("pairs", "images", "captions_ids"))


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


@pytest.mark.parametrize("recipe", ["supervised", "clip-reward"])
def test_a_recipe_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, components, recipe):
    """Batch 4, 2 epochs; a checkpoint every 2 steps; killed when step 5 (of 6 for supervised's 12 rows, of 12 for
    clip-reward's 24) ends; --resume continues from checkpoint-4."""
    extra, size = recipe_arguments(tmp_path, recipe)
    steps = 2 * size // 4
    hub_config = write_hub_config(tmp_path, eval_strategy="no", save_strategy="steps", save_steps=2,
                                  per_device_train_batch_size=4)
    full = run_worker(tmp_path, hub_config, components, tmp_path / "full", tmp_path / "full.log", extra)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_worker(tmp_path, hub_config, components, tmp_path / "run", tmp_path / "part1.log", extra,
                        env={"MACCAP_KILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    resumed = run_worker(tmp_path, hub_config, components, tmp_path / "run", tmp_path / "part2.log",
                         [*extra, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    uninterrupted, before_kill, after_resume = (batches(tmp_path / f"{n}.log.0") for n in ("full", "part1", "part2"))
    assert len(uninterrupted) == steps and len(before_kill) == 5 and len(after_resume) == steps - 4
    # Steps 1-4 before the kill, 5.. after the resume: the same batches in the same order, at the same weights.
    assert before_kill[:4] + after_resume == uninterrupted
    half = steps // 2
    assert rows(uninterrupted[half:]) == rows(uninterrupted[:half])  # epoch 2 is a permutation of epoch 1
    assert row_count(uninterrupted[:half]) == size
    expected, got = weights(tmp_path / "full"), weights(tmp_path / "run")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == steps

    # The resumed run's folder is a MacCap checkpoint for any transformers user: the remote code loads its weights,
    # and in an interpreter that cannot import this package, generate() and the pipeline write the package's captions.
    remote_weights = AutoModel.from_pretrained(tmp_path / "run", trust_remote_code=True).state_dict()
    for name, value in got.items():
        assert torch.equal(remote_weights[name], value), name
    image_paths = [str(tmp_path / "imgs" / f"{i}.png") for i in range(2)]
    model = MacCapForConditionalGeneration.from_pretrained(tmp_path / "run").eval()
    expected = model.processor.batch_decode(model.generate(**model.processor(images=image_paths)))
    remote = fresh_process(str(tmp_path / "run"), image_paths, tmp_path)
    assert remote["captions"] == expected
    assert remote["pipe_list"] == [[{"generated_text": caption}] for caption in expected]


@pytest.mark.parametrize("recipe", ["supervised", "clip-reward"])
def test_a_recipe_under_torchrun_trains_with_the_single_process_semantics(tmp_path, components, recipe):
    extra, size = recipe_arguments(tmp_path, recipe)
    hub_config = write_hub_config(tmp_path, eval_strategy="no", per_device_train_batch_size=4)
    single = run_worker(tmp_path, hub_config, components, tmp_path / "single", tmp_path / "single.log", extra)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    double = run_worker(tmp_path, hub_config, components, tmp_path / "ddp", tmp_path / "ddp.log",
                        [*extra, "--set", "per_device_train_batch_size=2"], torchrun)
    assert double.returncode == 0, double.stderr[-3000:]
    assert process_groups_left_up(tmp_path / "ddp.log") == ["False", "False"]

    one = batches(tmp_path / "single.log.0")
    rank0, rank1 = batches(tmp_path / "ddp.log.0"), batches(tmp_path / "ddp.log.1")
    steps = 2 * size // 4
    assert len(one) == len(rank0) == len(rank1) == steps
    for epoch in (slice(0, steps // 2), slice(steps // 2, steps)):
        assert rows(rank0[epoch] + rank1[epoch]) == rows(one[epoch]) == rows(one[:steps // 2])
    # The processes start equal and stay equal: their gradients are averaged before every optimizer step.
    assert [b["projector_sum"] for b in rank0] == [b["projector_sum"] for b in rank1]
    assert len({b["projector_sum"] for b in rank0}) == steps  # and the weights move at every step
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    MacCapForConditionalGeneration.from_pretrained(tmp_path / "ddp")

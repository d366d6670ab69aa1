"""Whole training runs in processes of their own: a run killed with SIGKILL and resumed ends where an
uninterrupted run ends; two processes under torchrun train with the single-process semantics; --push-to-hub
publishes through the same staging as upload.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.tools.cli import main
from modeling_maccap.tools.tiny import TINY_MACCAP

from .test_training import write_hub_config
from .test_upload import staged_files

WORKER = Path(__file__).parent / "train_worker.py"
CAPTIONS = [f"a {colour} {thing} on the {place}" for colour in ("red", "blue", "green")
            for thing in ("cat", "dog") for place in ("grass", "table")] + ["", "a bird", "a car", "  ", "a tree", "a bus"]


def run_worker(tmp_path, hub_config, components, out, log, launcher=(), env=None, *extra, worker=WORKER):
    """`maccap train` through `worker` (tests/train_worker.py) in a fresh process; returns the finished process."""
    command = [sys.executable, *launcher, str(worker), "train", "--hub-config", str(hub_config), "--clip",
               components[0], "--lm", components[1], "--output-dir", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=600,
                          env={**os.environ, "MACCAP_BATCH_LOG": str(log), **(env or {})})


def process_groups_left_up(log, ranks=2):
    """Per rank, whether its worker found a process group still up once `maccap train` had returned ("True" or
    "False", from BATCH_LOG.<rank>.group; a file per rank, as the ranks' stdout interleaves)."""
    return [Path(f"{log}.{rank}.group").read_text() for rank in range(ranks)]


def batches(log):
    return [json.loads(line) for line in Path(log).read_text().splitlines()]


def rows(batch_list):
    """The caption token rows of some batches, sorted, without the batch's right padding (pad = EOS = 0 here)."""
    def unpadded(row):
        return tuple(row[: max(i for i, token in enumerate(row) if token != 0) + 1])

    return sorted(unpadded(row) for batch in batch_list for row in batch)


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, components):
    """16 captions kept, 4 held out (not evaluated): 12 train, batch 2, 2 epochs = 12 steps, a checkpoint every 4.
    The run is killed when step 9 ends, in the middle of epoch 2 (steps 7-12); --resume continues from
    checkpoint-8."""
    hub_config = write_hub_config(tmp_path, CAPTIONS, per_device_train_batch_size=2, eval_strategy="no",
                                  save_strategy="steps", save_steps=4)
    full = run_worker(tmp_path, hub_config, components, tmp_path / "full", tmp_path / "full.log")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = run_worker(tmp_path, hub_config, components, tmp_path / "run", tmp_path / "part1.log",
                        env={"MACCAP_KILL_AT_STEP": "9"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    resumed = run_worker(tmp_path, hub_config, components, tmp_path / "run", tmp_path / "part2.log", (), None,
                         "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    uninterrupted, before_kill, after_resume = (batches(tmp_path / f"{name}.log.0") for name in ("full", "part1", "part2"))
    assert len(uninterrupted) == 12 and len(before_kill) == 9 and len(after_resume) == 4
    # Steps 1-8 come from before the kill (step 9 died with the process), 9-12 from the resumed run: the same
    # batches in the same order, so no caption of the interrupted epoch is skipped or seen twice.
    assert before_kill[:8] + after_resume == uninterrupted
    assert rows(uninterrupted[6:]) == rows(uninterrupted[:6])  # epoch 2 is a permutation of epoch 1

    for name in ("full", "run"):
        assert json.loads((tmp_path / name / "trainer_state.json").read_text())["global_step"] == 12
    expected, got = weights(tmp_path / "full"), weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_two_processes_under_torchrun_train_with_the_single_process_semantics(tmp_path, components):
    """Global batch 4 either way: 1 process x 4 or 2 processes x 2 -> the same 2 x ceil(12 / 4) optimizer steps,
    and in each epoch the two processes together see every training caption exactly once."""
    hub_config = write_hub_config(tmp_path, CAPTIONS)
    single = run_worker(tmp_path, hub_config, components, tmp_path / "single", tmp_path / "single.log")
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    double = run_worker(tmp_path, hub_config, components, tmp_path / "ddp", tmp_path / "ddp.log", torchrun, None,
                        "--set", "per_device_train_batch_size=2")
    assert double.returncode == 0, double.stderr[-3000:]
    assert "ParallelMode.DISTRIBUTED" not in double.stderr  # transformers' warning that DDP is not in use
    assert process_groups_left_up(tmp_path / "ddp.log") == ["False", "False"]

    one = batches(tmp_path / "single.log.0")
    rank0, rank1 = batches(tmp_path / "ddp.log.0"), batches(tmp_path / "ddp.log.1")
    assert len(one) == 6 and len(rank0) == len(rank1) == 6
    assert all(len(batch) == 2 for batch in rank0 + rank1)
    for epoch in (slice(0, 3), slice(3, 6)):
        assert rows(rank0[epoch] + rank1[epoch]) == rows(one[epoch]) == rows(one[:3])
        assert not set(rows(rank0[epoch])) & set(rows(rank1[epoch]))

    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["global_step"] == json.loads((tmp_path / "single" / "trainer_state.json").read_text())["global_step"]
    assert [e for e in state["log_history"] if "eval_token_accuracy" in e]
    initial = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=components[1],
                                                                        **TINY_MACCAP).state_dict()
    trained = weights(tmp_path / "ddp")
    for name, value in trained.items():
        assert torch.equal(value, initial[name]) != name.startswith("projector."), name
    MacCapForConditionalGeneration.from_pretrained(tmp_path / "ddp")  # a complete checkpoint


def test_push_to_hub_publishes_the_trained_model_with_its_card(hub, tmp_path, components):
    hub_config = write_hub_config(tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--hub-config", str(hub_config), "--clip", components[0], "--lm", components[1],
                 "--output-dir", str(out), "--max-steps", "2", "--push-to-hub", "org/tiny"]) == 0
    staging = tmp_path / "out-hub-staging"
    received = hub.files("org/tiny")
    assert received == staged_files(staging)
    assert received["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert {"README.md", "config.json", "modeling_maccap.py", "processor_config.json"} <= received.keys()
    assert "org/tiny" in received["README.md"].decode()


def test_push_to_hub_without_a_token_fails_before_training(hub, tmp_path, components, capsys,
                                                           monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["train", "--hub-config", str(write_hub_config(tmp_path)), "--clip", components[0], "--lm",
                 components[1], "--output-dir", str(tmp_path / "out"), "--push-to-hub", "org/tiny"]) == 2
    assert "--push-to-hub org/tiny: no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not hub.requests


"""`maccap caption`: which images a run takes and in what order, captions equal to the model's own one-by-one
`generate`, bad images recorded while the run goes on, resume after SIGKILL, and two processes under torchrun."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.tools.captioning import shard
from modeling_maccap.tools.cli import main

from .conftest import random_image


@pytest.fixture
def reference(checkpoint):
    """The checkpoint's captions computed image by image through the Python API: {source: caption}."""
    model = MacCapForConditionalGeneration.from_pretrained(checkpoint).eval()

    def captions(sources, dtype=None, **generate_kwargs):
        use = model if dtype is None else MacCapForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
        return [use.processor.batch_decode(use.generate(**use.processor(images=[source]), **generate_kwargs))[0]
                for source in sources]

    return captions


def write_images(folder, names, first_seed=0):
    """Random images of various sizes saved under `folder`; returns their absolute paths, as strings."""
    paths = []
    for seed, name in enumerate(names, first_seed):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(seed, (24 + 8 * (seed % 5), 40 - 4 * (seed % 3))).save(path)
        paths.append(str(path))
    return paths


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def caption(checkpoint, *arguments):
    return main(["caption", str(checkpoint), *map(str, arguments)])


def test_files_folders_and_globs_give_each_image_once_in_order_with_one_by_one_captions(
        checkpoint, reference, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    b, a, nested = write_images(folder, ["b.png", "a.jpg", "sub/c.JPEG"])
    write_images(folder, [".hidden.png", ".cache/d.png"], first_seed=10)  # hidden: skipped in folders
    (folder / "notes.txt").write_text("not an image")  # folders take image extensions only
    g2, g1 = write_images(tmp_path / "more", ["g2.png", "g1.png"], first_seed=20)
    single = write_images(tmp_path, ["single.webp"], first_seed=30)[0]
    out = tmp_path / "captions.jsonl"

    # The folder sorted by relative path, a file given again (kept once, at its first place), a quoted glob.
    assert caption(checkpoint, single, folder, a, tmp_path / "more" / "*.png", "--out", out) == 0
    expected = [single, a, b, nested, g1, g2]
    got = records(out)
    assert [r["image"] for r in got] == expected
    assert [r["image_name"] for r in got] == ["single.webp", "a.jpg", "b.png", "c.JPEG", "g1.png", "g2.png"]
    assert [r["caption"] for r in got] == reference(expected)
    assert set(got[0]) == {"image", "image_name", "caption"}
    assert not (tmp_path / "captions.errors.jsonl").exists()
    assert "6 captioned, 0 failed, 0 skipped as already done" in capsys.readouterr().out

    # A recursive glob, given relative to the working directory: the output names the absolute path.
    monkeypatch.chdir(tmp_path)
    assert caption(checkpoint, "photos/**/*.*", "--out", "relative.jsonl") == 0
    assert [r["image"] for r in records(tmp_path / "relative.jsonl")] == [a, b, nested]
    # A glob takes what it matches, as the shell would: a text file it names is an error, not skipped.
    assert [r["image"] for r in records(tmp_path / "relative.errors.jsonl")] == [str(folder / "notes.txt")]


def test_batch_size_and_workers_do_not_change_captions(checkpoint, reference, tmp_path):
    paths = write_images(tmp_path / "in", [f"{i}.png" for i in range(5)])
    runs = {}
    for batch_size, workers in ((1, 0), (2, 2), (5, 1)):
        out = tmp_path / f"b{batch_size}.jsonl"
        assert caption(checkpoint, tmp_path / "in", "--out", out, "--batch-size", batch_size,
                       "--num-workers", workers) == 0
        runs[batch_size] = records(out)
    assert runs[1] == runs[2] == runs[5]
    assert [r["caption"] for r in runs[1]] == reference(paths)


def test_bad_images_go_to_the_errors_file_and_the_run_goes_on(checkpoint, reference, tmp_path, capsys):
    good = write_images(tmp_path / "in", ["1.png", "3.png", "5.png"])
    png = io.BytesIO()
    random_image(7, (64, 64)).save(png, format="PNG")
    truncated, empty, text = tmp_path / "in" / "2.png", tmp_path / "in" / "4.png", tmp_path / "notes.txt"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    empty.write_bytes(b"")
    text.write_text("hello")
    out = tmp_path / "run" / "captions.jsonl"

    # One batch of six holds all three bad images: the good ones of that batch are still captioned.
    assert caption(checkpoint, tmp_path / "in", text, "--out", out, "--batch-size", 6) == 0
    assert [r["image"] for r in records(out)] == good
    assert [r["caption"] for r in records(out)] == reference(good)
    errors = {r["image"]: r for r in records(tmp_path / "run" / "captions.errors.jsonl")}
    assert list(errors) == [str(truncated), str(empty), str(text)]
    assert errors[str(truncated)]["error"].startswith("corrupt or truncated image")
    assert errors[str(empty)]["error"] == "empty file (0 bytes)"
    assert errors[str(text)]["error"] == "not an image file (or a format PIL cannot read)"
    assert errors[str(text)]["image_name"] == "notes.txt"
    printed = capsys.readouterr().out
    assert "3 captioned, 3 failed, 0 skipped as already done" in printed
    assert str(tmp_path / "run" / "captions.errors.jsonl") in printed

    # Fixed, then resumed: the failed image is retried, captioned, and leaves the errors file.
    random_image(7, (64, 64)).save(truncated)
    assert caption(checkpoint, tmp_path / "in", text, "--out", out, "--resume") == 0
    assert [r["image"] for r in records(out)] == good + [str(truncated)]
    assert records(out)[-1]["caption"] == reference([str(truncated)])[0]
    assert [r["image"] for r in records(tmp_path / "run" / "captions.errors.jsonl")] == [str(empty), str(text)]
    assert "1 captioned, 2 failed, 3 skipped as already done" in capsys.readouterr().out


def image_dataset(images, **columns):
    """A dataset with an Image column from PIL images, or raw bytes for rows that are not images."""
    def encoded(image):
        if isinstance(image, bytes):
            return {"bytes": image, "path": None}
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = {"image": datasets.Image(), **{name: datasets.Value("string") for name in columns}}
    return datasets.Dataset.from_dict({"image": [encoded(image) for image in images], **columns},
                                      features=datasets.Features(features))


def test_a_saved_dataset_split_is_captioned_row_by_row(checkpoint, reference, tmp_path):
    images = [random_image(1), b"not an image", random_image(2, (30, 60)), random_image(3)]
    splits = datasets.DatasetDict({
        "test": image_dataset(images, file_name=["x.jpg", "y.jpg", "z.jpg", "w.jpg"]),
        "train": image_dataset([random_image(4)], file_name=["t.jpg"]),
    })
    splits.save_to_disk(tmp_path / "coco")
    out = tmp_path / "captions.jsonl"

    assert caption(checkpoint, "--dataset", tmp_path / "coco", "--split", "test", "--out", out, "--batch-size", 3) == 0
    label = f"dataset:{tmp_path / 'coco'}/test"
    assert [(r["image"], r["image_name"]) for r in records(out)] == [
        (f"{label}/0", "x.jpg"), (f"{label}/2", "z.jpg"), (f"{label}/3", "w.jpg")]
    assert [r["caption"] for r in records(out)] == reference([images[0], images[2], images[3]])
    assert records(tmp_path / "captions.errors.jsonl") == [
        {"image": f"{label}/1", "image_name": "y.jpg", "error": "not an image (or a format PIL cannot read)"}]

    # Two splits and none chosen: refused, naming them. No name column: the row index names the image.
    assert caption(checkpoint, "--dataset", tmp_path / "coco", "--out", tmp_path / "other.jsonl") == 2
    image_dataset(images[2:]).save_to_disk(tmp_path / "plain")
    assert caption(checkpoint, "--dataset", tmp_path / "plain", "--out", tmp_path / "plain.jsonl") == 0
    assert [(r["image"], r["image_name"]) for r in records(tmp_path / "plain.jsonl")] == [
        (f"dataset:{tmp_path / 'plain'}/train/0", "0"), (f"dataset:{tmp_path / 'plain'}/train/1", "1")]


def test_an_imagefolder_dataset_names_images_by_their_file_names(checkpoint, reference, tmp_path, capsys):
    paths = write_images(tmp_path / "folder", ["COCO_val2014_000000000002.jpg", "COCO_val2014_000000000001.jpg"])
    out = tmp_path / "captions.jsonl"
    assert caption(checkpoint, "--dataset", tmp_path / "folder", "--out", out) == 0
    by_name = {r["image_name"]: r["caption"] for r in records(out)}
    assert by_name == dict(zip([os.path.basename(p) for p in paths], reference(paths)))

    assert caption(checkpoint, "--dataset", tmp_path / "folder", "--image-column", "picture", "--out",
                   tmp_path / "x.jsonl") == 2
    assert "no column 'picture' (columns: image)" in capsys.readouterr().err


def test_a_hub_dataset_is_asked_for_its_split_only(checkpoint, reference, tmp_path, monkeypatch, capsys):
    """No Hub here: datasets' entry points are replaced, to see what a Hub id is asked for."""
    images = [random_image(5), random_image(6)]
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return image_dataset(images, image_id=["5", "6"])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path, config=None: ["train", "validation"])
    assert caption(checkpoint, "--dataset", "org/coco", "--out", tmp_path / "a.jsonl") == 2
    assert "choose a split with --split (splits: train, validation)" in capsys.readouterr().err and not calls

    out = tmp_path / "b.jsonl"
    assert caption(checkpoint, "--dataset", "org/coco", "--dataset-config", "2014", "--split", "validation",
                   "--out", out) == 0
    assert calls == [("org/coco", "2014", "validation")]
    assert [(r["image"], r["image_name"]) for r in records(out)] == [
        ("dataset:org/coco/validation/0", "5"), ("dataset:org/coco/validation/1", "6")]
    assert [r["caption"] for r in records(out)] == reference(images)

    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path, config=None: ["test"])
    assert caption(checkpoint, "--dataset", "org/coco", "--out", tmp_path / "c.jsonl") == 0
    assert calls[-1] == ("org/coco", None, "test")


def test_generation_options_reach_generate(checkpoint, reference, tmp_path):
    paths = write_images(tmp_path / "in", ["1.png", "2.png"])
    out = tmp_path / "beams.jsonl"
    assert caption(checkpoint, tmp_path / "in", "--out", out, "--no-rerank", "--num-beams", 2, "--max-new-tokens",
                   5, "--noise-seed", 3) == 0
    assert [r["caption"] for r in records(out)] == reference(paths, rerank=False, num_beams=2, max_new_tokens=5,
                                                             noise_seed=3)
    out = tmp_path / "candidates.jsonl"
    assert caption(checkpoint, tmp_path / "in", "--out", out, "--num-candidates", 2, "--dtype", "bfloat16",
                   "--batch-size", 1) == 0  # one by one: batch invariance is a float32 promise
    assert [r["caption"] for r in records(out)] == reference(paths, dtype=torch.bfloat16, num_candidates=2)


def test_existing_output_is_refused_without_resume_and_missing_inputs_fail_before_any_work(
        checkpoint, tmp_path, capsys):
    write_images(tmp_path / "in", ["1.png"])
    out = tmp_path / "captions.jsonl"
    out.write_text('{"image": "/x.png", "image_name": "x.png", "caption": "a cat"}\n')
    assert caption(checkpoint, tmp_path / "in", "--out", out) == 2
    assert "already holds captions: pass --resume" in capsys.readouterr().err
    assert out.read_text() == '{"image": "/x.png", "image_name": "x.png", "caption": "a cat"}\n'

    # Every missing input named in one error, before the (here nonexistent) model is even looked at.
    fresh = tmp_path / "fresh.jsonl"
    assert main(["caption", str(tmp_path / "no-model"), str(tmp_path / "in"), str(tmp_path / "missing.jpg"),
                 str(tmp_path / "*.gif"), "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing.jpg'}: no such file or folder; {tmp_path / '*.gif'}: no files match" in err
    assert "no-model" not in err and not fresh.exists()
    assert main(["caption", str(tmp_path / "no-model"), str(tmp_path / "in"), "--out", str(fresh)]) == 2
    assert f"cannot load the MacCap model {tmp_path / 'no-model'}: no such folder" in capsys.readouterr().err


def test_a_run_killed_with_sigkill_resumes_without_losing_or_repeating_an_image(checkpoint, reference, tmp_path):
    paths = write_images(tmp_path / "in", [f"{i:02d}.png" for i in range(16)])
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "modeling_maccap.tools.cli", "caption", str(checkpoint), str(tmp_path / "in"),
               "--out", str(out), "--batch-size", "2", "--num-workers", "0"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
    before = out.read_text()
    written = records(out)
    assert 2 <= len(written) < 16 and [r["image"] for r in written] == paths[: len(written)]

    # A torn line, as a kill in the middle of a write leaves: dropped, and its image captioned again.
    torn = json.dumps({"image": paths[len(written)], "image_name": "x", "caption": "a"})[:40]
    out.write_text(before + torn)
    assert caption(checkpoint, tmp_path / "in", "--out", out, "--resume") == 0
    assert out.read_text().startswith(before)
    assert [r["image"] for r in records(out)] == paths  # every line whole JSON: the torn fragment is gone
    assert [r["caption"] for r in records(out)] == reference(paths)


def test_leftover_process_shards_are_merged_on_resume(checkpoint, reference, tmp_path):
    """A multi-process run killed before the merge left captions in <out>.rank<R>; a resumed run (here one
    process) skips them and merges them into <out> in input order."""
    paths = write_images(tmp_path / "in", [f"{i}.png" for i in range(5)])
    expected = reference(paths)

    def line(i):
        return json.dumps({"image": paths[i], "image_name": f"{i}.png", "caption": expected[i]}) + "\n"

    out = tmp_path / "captions.jsonl"
    (tmp_path / "captions.jsonl.rank0").write_text(line(2) + line(0))
    (tmp_path / "captions.jsonl.rank1").write_text(line(3) + line(1)[:25])  # torn: 1 is not done
    assert caption(checkpoint, tmp_path / "in", "--out", out) == 2  # shards of a run: not overwritten
    assert caption(checkpoint, tmp_path / "in", "--out", out, "--resume") == 0
    assert out.read_text() == "".join(line(i) for i in (1, 4, 0, 2, 3))  # this run's first, then the merged
    assert not list(tmp_path.glob("captions.jsonl.rank*"))


def test_shards_are_disjoint_complete_balanced_and_deterministic():
    items = list(range(11))
    for world_size in (1, 2, 3, 4):
        shares = [shard(items, rank, world_size) for rank in range(world_size)]
        assert sorted(x for share in shares for x in share) == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert shares == [shard(list(range(11)), rank, world_size) for rank in range(world_size)]
    assert shard(items, 1, 3) == [1, 4, 7, 10]


def test_two_processes_under_torchrun_caption_each_image_once(checkpoint, reference, tmp_path):
    paths = write_images(tmp_path / "in", [f"{i}.png" for i in range(5)])
    (tmp_path / "in" / "9.png").write_bytes(b"broken")
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "modeling_maccap.tools.cli", "caption", str(checkpoint), str(tmp_path / "in"), "--out", str(out),
               "--batch-size", "2"]
    run = subprocess.run(command, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(process 0 of 2)" in run.stderr and "(process 1 of 2)" in run.stderr
    assert [r["image"] for r in records(out)] == paths  # rank 0 took 0, 2, 4; rank 1 took 1, 3, 9
    assert [r["caption"] for r in records(out)] == reference(paths)
    assert [r["image"] for r in records(tmp_path / "captions.errors.jsonl")] == [str(tmp_path / "in" / "9.png")]
    assert "5 captioned, 1 failed, 0 skipped as already done" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.errors.jsonl", "captions.jsonl", "in",
                                                          "maccap-tiny"]

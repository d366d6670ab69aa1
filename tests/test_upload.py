"""upload.py / `maccap upload`: the staged repo folder is complete and loads as remote code with the source
model's outputs; the push goes through a stand-in Hub on 127.0.0.1 and arrives byte-identical; every failure
says what happened and keeps the staged folder."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi

from modeling_maccap.tools.cli import main
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.hub import STAGING_MARKER, stage
from modeling_maccap.tools.hub_config import load_hub_config
from modeling_maccap.tools.tiny import TINY_MACCAP

from .conftest import TOKEN, random_image
from .hub_server import FakeHub
from .test_hub_config import read
from .test_remote_code import REMOTE_FILES, fresh_process

ROOT = Path(__file__).parent.parent
COCO_GPT2 = ROOT / "hub_configs" / "maccap-clip-vit-b32-gpt2-coco.json"
COCO_OPT = ROOT / "hub_configs" / "maccap-clip-vit-b32-opt-1.3b-coco.json"
RESULTS = {"dataset": {"id": "yerevann/coco-karpathy", "name": "COCO Karpathy test", "split": "test"},
           "metrics": {"BLEU-4": 0.123, "CIDEr": 0.456}}


@pytest.fixture
def hub_config_file(tmp_path):
    """The COCO variant with the tiny model's method settings (the ones `checkpoint` was built with)."""
    data = read(COCO_GPT2)
    data["architecture"]["maccap"].update(TINY_MACCAP)
    path = tmp_path / "variant.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    return path


def staged_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and p.name != STAGING_MARKER}


def front_matter(card_text):
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n")[1])


@pytest.fixture
def image_paths(tmp_path):
    paths = []
    for i, seed in enumerate((30, 31)):
        paths.append(str(tmp_path / f"image{i}.png"))
        random_image(seed).save(paths[-1])
    return paths


# ------------------------------------------------------------------------------------------------- staging
def test_staged_folder_is_the_exact_repo(checkpoint, hub_config_file, results_file, tmp_path):
    staging = stage(checkpoint, load_hub_config(hub_config_file), tmp_path / "staging", repo_id="org/name",
                    eval_results=results_file)
    names = set(staged_files(staging))
    assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
            "README.md", *REMOTE_FILES} <= names
    assert any(n.startswith("clip_tokenizer/") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((staging / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_maccap.MacCapForConditionalGeneration"
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_maccap.MacCapImageToTextPipeline"


def test_model_card_metadata_and_body(checkpoint, hub_config_file, results_file, tmp_path):
    hub = load_hub_config(hub_config_file)
    staging = stage(checkpoint, hub, tmp_path / "staging", repo_id="org/name", eval_results=results_file)
    card = (staging / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-to-text"
    assert {"zero-shot-image-captioning", "custom_code"} <= set(meta["tags"])
    assert meta["license"] == "mit"
    assert meta["base_model"] == ["openai/clip-vit-base-patch32", "openai-community/gpt2"]
    assert meta["datasets"] == ["yerevann/coco-karpathy"]
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["task"]["type"] == "image-to-text"
    assert result["dataset"] == {"name": "COCO Karpathy test", "type": "yerevann/coco-karpathy", "split": "test"}
    assert {(m["name"], m["value"]) for m in result["metrics"]} == {("BLEU-4", 0.123), ("CIDEr", 0.456)}

    for heading in ("## Usage", "## Training recipe", "## Evaluation", "## Limitations", "## Citation"):
        assert heading in card
    assert 'AutoModel.from_pretrained("org/name", trust_remote_code=True)' in card
    assert 'pipeline("image-to-text", model="org/name", trust_remote_code=True)' in card
    assert "Mining Fine-Grained Image-Text Alignment for Zero-Shot Captioning via Text-Only Training" in card
    assert "@inproceedings" in card
    assert "| `learning_rate` | `0.0001` |" in card and "| `num_queries` | `4` |" in card
    assert "| COCO Karpathy test | test | CIDEr | 0.4560 |" in card


def test_vqa_results_are_filed_under_visual_question_answering(checkpoint, hub_config_file, tmp_path):
    vqa = {"dataset": {"id": "vqav2", "name": "VQAv2", "split": "val2014"}, "scale": "percent",
           "metrics": {"VQA accuracy": 41.25}}
    (tmp_path / "all.json").write_text(json.dumps([RESULTS, vqa]))
    staging = stage(checkpoint, load_hub_config(hub_config_file), tmp_path / "staging", repo_id="org/name",
                    eval_results=tmp_path / "all.json")
    card = (staging / "README.md").read_text()
    tasks = {metric["name"]: result["task"]["type"] for result in front_matter(card)["model-index"][0]["results"]
             for metric in result["metrics"]}
    assert tasks == {"BLEU-4": "image-to-text", "CIDEr": "image-to-text", "VQA accuracy": "visual-question-answering"}
    assert "| VQAv2 | val2014 | VQA accuracy | 41.2500 | percent |" in card


def test_card_without_results_claims_no_scores(checkpoint, tmp_path):
    data = read(COCO_OPT)  # a license of its own ("other", with name and link), other base models
    data["architecture"]["maccap"].update(TINY_MACCAP)
    (tmp_path / "other.json").write_text(json.dumps(data))
    staging = stage(checkpoint, load_hub_config(tmp_path / "other.json"), tmp_path / "staging")
    card = (staging / "README.md").read_text()
    meta = front_matter(card)
    assert "model-index" not in meta
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", data["hub"]["license_name"], data["hub"]["license_link"])
    assert meta["base_model"] == [data["architecture"]["components"]["clip"], data["architecture"]["components"]["lm"]]
    assert meta["datasets"] == [data["corpus"]["hub_id"]]
    assert "no scores are claimed" in card
    assert f'model="{data["hub"]["repo_id"]}"' in card  # the hub config's repo id when none is given


def test_sharded_staging_loads_in_a_fresh_process_with_the_source_outputs(model, processor, checkpoint,
                                                                         hub_config_file, image_paths, tmp_path):
    staging = stage(checkpoint, load_hub_config(hub_config_file), tmp_path / "staging", max_shard_size="150KB")
    shards = sorted(p.name for p in staging.glob("model-*.safetensors"))
    assert len(shards) > 1 and (staging / "model.safetensors.index.json").is_file()
    got = fresh_process(str(staging), image_paths, tmp_path)
    expected = processor.batch_decode(model.generate(**processor(images=image_paths)))
    assert got["captions"] == expected
    assert got["pipe_list"] == [[{"generated_text": c}] for c in expected]


def test_dry_run_stages_and_pushes_nothing(checkpoint, hub_config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    staging = tmp_path / "staging"
    assert main(["upload", str(checkpoint), "--hub-config", str(hub_config_file), "--repo-id", "org/name",
                 "--staging-dir", str(staging), "--dry-run"]) == 0
    assert (staging / "README.md").is_file() and "pushed" not in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: (ckpt / "config.json").unlink(), "has no config.json"),
    (lambda ckpt: (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"})), "holds a 'gpt2' model"),
    (lambda ckpt: (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin"), "has no safetensors weights"),
    (lambda ckpt: (ckpt / "processor_config.json").unlink(), "has no processor files"),
    (lambda ckpt: (ckpt / "model.safetensors").write_bytes(b"not a safetensors file"), "cannot load the checkpoint"),
])
def test_a_wrong_checkpoint_is_named(checkpoint, hub_config_file, tmp_path, capsys, damage, message):
    damage(checkpoint)
    assert main(["upload", str(checkpoint), "--hub-config", str(hub_config_file), "--dry-run",
                 "--staging-dir", str(tmp_path / "staging")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(checkpoint) in err


def test_a_checkpoint_trained_with_other_settings_is_refused(checkpoint, tmp_path, capsys):
    data = read(COCO_GPT2)
    data["architecture"]["maccap"].update(TINY_MACCAP, num_subregions=5)
    (tmp_path / "other.json").write_text(json.dumps(data))
    assert main(["upload", str(checkpoint), "--hub-config", str(tmp_path / "other.json"), "--dry-run",
                 "--staging-dir", str(tmp_path / "staging")]) == 2
    assert "num_subregions: checkpoint 10, hub config 5" in capsys.readouterr().err
    with pytest.raises(MacCapError, match="num_queries: checkpoint 4, hub config 32"):  # a default it leaves unset
        stage(checkpoint, load_hub_config(COCO_GPT2), tmp_path / "staging")


def test_staging_never_overwrites_a_folder_it_did_not_make(checkpoint, hub_config_file, tmp_path):
    hub = load_hub_config(hub_config_file)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="was not made by maccap upload"):
        stage(checkpoint, hub, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    staging = stage(checkpoint, hub, tmp_path / "staging")
    (staging / "stale.txt").write_text("from an earlier staging")
    stage(checkpoint, hub, staging)  # its own folder: rebuilt from scratch
    assert not (staging / "stale.txt").exists()


# ---------------------------------------------------------------------------------------------------- push
def upload(checkpoint, hub_config_file, staging, *extra):
    return main(["upload", str(checkpoint), "--hub-config", str(hub_config_file), "--repo-id", "org/name",
                 "--staging-dir", str(staging), *extra])


def test_missing_token_is_explained_and_the_staging_kept(hub, checkpoint, hub_config_file, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert upload(checkpoint, hub_config_file, tmp_path / "staging") == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in err
    assert f"the staged folder {tmp_path / 'staging'} is kept" in err
    assert (tmp_path / "staging" / "model.safetensors").is_file()
    assert not hub.commits


def test_existing_repo_is_explained_then_exist_ok_adds_a_commit(hub, checkpoint, hub_config_file, tmp_path, capsys):
    hub.add_repo("org/name", files={"old.txt": b"old"})
    staging = tmp_path / "staging"
    assert upload(checkpoint, hub_config_file, staging) == 2
    err = capsys.readouterr().err
    assert "the repo org/name already exists" in err and "--exist-ok" in err
    assert hub.files("org/name") == {"old.txt": b"old"} and (staging / "README.md").is_file()
    assert upload(checkpoint, hub_config_file, staging, "--exist-ok") == 0
    assert hub.files("org/name") == {"old.txt": b"old", **staged_files(staging)}


def test_dropped_connection_keeps_the_staging_and_a_retry_completes(hub, checkpoint, hub_config_file, tmp_path,
                                                                    capsys, monkeypatch):
    staging = tmp_path / "staging"
    # With hf_xet installed, huggingface_hub retries a dropped commit once and the retry would get through;
    # without it (the create_commit path) the first drop is final, as a drop that outlasts the retries is.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    hub.drop_next_commit = True
    assert upload(checkpoint, hub_config_file, staging) == 2
    err = capsys.readouterr().err
    assert "upload of" in err and "failed" in err and "is kept" in err
    assert hub.files("org/name") == {}
    before = staged_files(staging)
    assert upload(checkpoint, hub_config_file, staging, "--exist-ok") == 0
    assert hub.files("org/name") == before


def test_private_branch_and_commit_message(hub, checkpoint, hub_config_file, tmp_path):
    staging = tmp_path / "staging"
    assert upload(checkpoint, hub_config_file, staging, "--private", "--revision", "v1",
                  "--commit-message", "MacCap tiny v1") == 0
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info("org/name").private is True
    assert hub.files("org/name", revision="v1") == staged_files(staging)
    assert "README.md" not in hub.files("org/name")
    assert hub.commits[-1]["summary"] == "MacCap tiny v1" and hub.commits[-1]["revision"] == "v1"


def hub_env(server):
    """This process's environment pointed at the stand-in Hub `server`, with its token, online."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=server.url, HF_TOKEN=TOKEN, PYTHONPATH="")
    return env


def run_upload_script(server, checkpoint, hub_config_file, staging, *arguments):
    """`python upload.py CHECKPOINT` to org/name in a process of its own, against the stand-in Hub `server`."""
    env = hub_env(server)
    return subprocess.run([sys.executable, str(ROOT / "upload.py"), str(checkpoint), "--hub-config",
                           str(hub_config_file), "--repo-id", "org/name", "--staging-dir", str(staging), *arguments],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL)


def test_upload_script_pushes_byte_identical_files_that_load_through_the_hub(model, processor, checkpoint,
                                                                            hub_config_file, results_file,
                                                                            image_paths, tmp_path):
    """`python upload.py` in its own process, then from_pretrained("org/name") in another, both through the
    stand-in Hub: the repo holds exactly the staged bytes and captions like the source model."""
    with FakeHub(tokens=(TOKEN,)) as server:
        staging = tmp_path / "staging"
        run = run_upload_script(server, checkpoint, hub_config_file, staging, "--eval-results", str(results_file))
        assert run.returncode == 0, run.stderr[-3000:]
        assert "pushed" in run.stdout
        assert server.files("org/name") == staged_files(staging)

        # Downloads need no token (none is passed on); the test session's HF_HUB_OFFLINE=1 is lifted.
        got = fresh_process("org/name", image_paths, tmp_path, {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0"})
    expected = processor.batch_decode(model.generate(**processor(images=image_paths)))
    assert got["captions"] == expected and got["itt_captions"] == expected
    assert got["pipe_list"] == [[{"generated_text": c}] for c in expected]


# --------------------------------------------------------------------------------------------------- Space
SPACE_APP = textwrap.dedent(
    """
    import runpy, sys
    sys.modules["modeling_maccap"] = None  # the Space has no maccap package: the model comes as remote code
    runpy.run_path("app.py", run_name="__main__")
    """
)


def test_space_is_staged_pushed_and_serves_the_model_from_the_hub(model, processor, checkpoint, hub_config_file,
                                                                  tmp_path):
    """`upload.py --space` pushes the model and a Space beside it; the Space's app.py, run from the files the Hub
    holds in a process without this package, loads the model from the Hub and captions like the source model."""
    import importlib.metadata

    gradio_client = pytest.importorskip("gradio_client")
    from modeling_maccap.tools import serve_app

    from .test_serve import free_port, serve_env, start, stop

    with FakeHub(tokens=(TOKEN,)) as server:
        staging = tmp_path / "staging"
        run = run_upload_script(server, checkpoint, hub_config_file, staging, "--space", "org/name-demo")
        assert run.returncode == 0, run.stderr[-3000:]
        space = Path(f"{staging}-space")
        assert server.files("org/name") == staged_files(staging)
        files = server.files("org/name-demo", repo_type="space")
        assert files == staged_files(space) and set(files) == {"app.py", "requirements.txt", "README.md"}
        assert [c["sdk"] for c in server.created if c.get("type") == "space"] == ["gradio"]

        source = (Path(serve_app.__file__)).read_text()
        assert files["app.py"].decode() == source.replace("SPACE_MODEL_ID = None", 'SPACE_MODEL_ID = "org/name"')
        meta = front_matter(files["README.md"].decode())
        assert (meta["sdk"], meta["app_file"], meta["models"]) == ("gradio", "app.py", ["org/name"])
        assert meta["sdk_version"] == importlib.metadata.version("gradio")
        pins = dict(line.split("==") for line in files["requirements.txt"].decode().splitlines()
                    if not line.startswith("#"))
        assert pins["transformers"] == importlib.metadata.version("transformers")
        assert pins["torch"] == importlib.metadata.version("torch").split("+")[0]
        card = server.files("org/name")["README.md"].decode()
        assert "(https://huggingface.co/spaces/org/name-demo)" in card

        (tmp_path / "space").mkdir()
        for name, data in files.items():
            (tmp_path / "space" / name).write_bytes(data)
        port = free_port()
        app_env = {**serve_env(), **hub_env(server), "HF_HUB_OFFLINE": "0", "GRADIO_SERVER_NAME": "127.0.0.1",
                   "GRADIO_SERVER_PORT": str(port)}
        app_env.pop("HF_TOKEN")  # a public model repo: the Space needs no token
        process, url = start([sys.executable, "-c", SPACE_APP], port, tmp_path / "space.log", tmp_path / "space",
                             app_env)
        try:
            image = tmp_path / "photo.png"
            random_image(90).save(image)
            client = gradio_client.Client(url, verbose=False, download_files=False)
            _, text, _, status = client.predict([gradio_client.handle_file(str(image))], 4, 4, 16, 0,
                                                api_name="/caption")
        finally:
            stop(process)
    assert status == ""
    assert text == f"photo.png: {processor.batch_decode(model.generate(**processor(images=[str(image)])))[0]}"


def test_space_with_revision_is_refused(checkpoint, hub_config_file, tmp_path, capsys):
    assert main(["upload", str(checkpoint), "--hub-config", str(hub_config_file), "--space", "org/demo",
                 "--revision", "v1", "--dry-run", "--staging-dir", str(tmp_path / "staging")]) == 2
    assert "--space with --revision: a Space runs its main branch" in capsys.readouterr().err

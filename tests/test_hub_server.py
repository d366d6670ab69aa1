"""The Hub stand-in (tests/hub_server.py) behaves like the Hub for huggingface_hub's own client and for transformers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from .conftest import TOKEN
from .hub_server import FakeHub

FILES = {
    "config.json": b'{"model_type": "gpt2"}\n',
    "weights.bin": bytes(range(256)) * 9 + b"\x00\xff",
    "empty.bin": b"",
    "sub/notes.txt": "héllo\r\nworld\n".encode(),
    "sub/deeper/table.csv": b"a,b\n1,2\n",
}


@pytest.fixture
def hub(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 at import: huggingface_hub reads it once, from constants, on every request.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub(tokens=(TOKEN,)) as server:
        yield server


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=TOKEN)


def write_folder(folder: Path, files: dict) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def read_folder(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def commit_posts(hub):
    return [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]


def test_create_repo_twice_conflicts_unless_exist_ok(hub, api):
    url = api.create_repo("org/model")
    assert url.repo_id == "org/model" and url.startswith(hub.url)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/model")
    assert err.value.response.status_code == 409
    assert api.create_repo("org/model", exist_ok=True).repo_id == "org/model"
    assert api.repo_exists("org/model") and not api.repo_exists("org/other")
    assert api.whoami()["name"] == "tester"
    assert hub.requests[0] == ("POST", "/api/repos/create")


def test_writes_need_a_valid_token(hub, tmp_path):
    hub.add_repo("org/model")
    folder = write_folder(tmp_path, {"a.txt": b"a"})
    for token in (False, "hf_wrong"):  # no Authorization header, then an unknown token
        other = HfApi(endpoint=hub.url, token=token)
        for write in (lambda: other.create_repo("org/new"),
                      lambda: other.create_branch("org/model", branch="dev"),
                      lambda: other.upload_folder(repo_id="org/model", folder_path=folder)):
            with pytest.raises(HfHubHTTPError) as err:
                write()
            assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.url, token="hf_wrong").whoami()
    assert not HfApi(endpoint=hub.url, token="hf_wrong").repo_exists("org/new")
    assert hub.files("org/model") == {} and hub.commits == []
    assert HfApi(endpoint=hub.url, token=False).repo_exists("org/model")  # reads need no token


def test_upload_folder_stores_the_exact_bytes(hub, api, tmp_path):
    api.create_repo("org/model")
    info = api.upload_folder(repo_id="org/model", folder_path=write_folder(tmp_path, FILES), commit_message="up")
    assert hub.files("org/model") == FILES
    assert hub.commits == [{"repo_id": "org/model", "repo_type": "model", "revision": "main", "summary": "up",
                            "paths": sorted(FILES)}]
    model = api.model_info("org/model")
    assert model.sha == info.oid and sorted(s.rfilename for s in model.siblings) == sorted(FILES)
    assert hub.files("org/model", revision=info.oid) == FILES
    # Unchanged files are skipped on the next upload, like on the Hub (preupload answers their oid).
    (tmp_path / "weights.bin").write_bytes(b"new")
    api.upload_folder(repo_id="org/model", folder_path=tmp_path)
    assert hub.commits[-1]["paths"] == ["weights.bin"] and hub.files("org/model")["weights.bin"] == b"new"
    api.delete_file("empty.bin", repo_id="org/model")
    api.delete_folder("sub", repo_id="org/model")
    assert sorted(hub.files("org/model")) == ["config.json", "weights.bin"]


def test_snapshot_and_single_file_downloads(hub, api, tmp_path):
    hub.add_repo("org/model", files=FILES)
    folder = snapshot_download("org/model", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert read_folder(Path(folder)) == FILES
    local = snapshot_download("org/model", endpoint=hub.url, local_dir=tmp_path / "local")
    assert read_folder(Path(local)) == FILES
    path = hf_hub_download("org/model", "sub/notes.txt", endpoint=hub.url, cache_dir=tmp_path / "cache2")
    assert Path(path).read_bytes() == FILES["sub/notes.txt"]
    tree = api.list_repo_tree("org/model", path_in_repo="sub")
    assert sorted(entry.path for entry in tree) == ["sub/deeper", "sub/notes.txt"]


def test_missing_file_repo_and_revision_raise_the_hub_errors(hub, tmp_path):
    hub.add_repo("org/model", files={"a.txt": b"a"})
    download = dict(endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/model", "missing.txt", **download)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nothing", "a.txt", **download)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/model", "a.txt", revision="nope", **download)


def test_private_repo_is_hidden_without_a_token(hub, api, tmp_path):
    hub.add_repo("org/secret", files={"a.txt": b"a"}, private=True)
    assert api.model_info("org/secret").private is True
    assert not HfApi(endpoint=hub.url, token=False).repo_exists("org/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/secret", "a.txt", endpoint=hub.url, cache_dir=tmp_path, token=False)


def test_upload_to_a_branch_leaves_main_alone(hub, api, tmp_path):
    api.create_repo("org/model")
    api.upload_folder(repo_id="org/model", folder_path=write_folder(tmp_path / "v1", {"a.txt": b"a"}))
    with pytest.raises(RevisionNotFoundError):  # the branch must be created first, like on the Hub
        api.upload_folder(repo_id="org/model", folder_path=tmp_path / "v1", revision="feature/x")
    api.create_branch("org/model", branch="feature/x")  # quoted as feature%2Fx in the URL
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("org/model", branch="feature/x")
    assert err.value.response.status_code == 409
    api.create_branch("org/model", branch="feature/x", exist_ok=True)
    api.upload_folder(repo_id="org/model", folder_path=write_folder(tmp_path / "v2", {"b.txt": b"b"}),
                      revision="feature/x")
    assert hub.files("org/model") == {"a.txt": b"a"}
    assert hub.files("org/model", revision="feature/x") == {"a.txt": b"a", "b.txt": b"b"}
    assert hub.commits[-1]["revision"] == "feature/x"
    path = hf_hub_download("org/model", "b.txt", revision="feature/x", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"b"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/model", "b.txt", endpoint=hub.url, cache_dir=tmp_path / "c")


def test_dropped_commit_fails_a_single_commit_upload(hub, api, tmp_path, monkeypatch):
    # Without hf_xet (or with HF_HUB_DISABLE_XET=1) upload_folder is one create_commit, POSTed once, no retry.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    api.create_repo("org/model")
    folder = write_folder(tmp_path, FILES)
    hub.drop_next_commit = True
    with pytest.raises(httpx2.NetworkError):  # httpx2.ReadError: [Errno 104] Connection reset by peer
        api.upload_folder(repo_id="org/model", folder_path=folder)
    assert len(commit_posts(hub)) == 1 and hub.drop_next_commit is False
    assert hub.files("org/model") == {} and hub.commits == []
    api.upload_folder(repo_id="org/model", folder_path=folder)
    assert hub.files("org/model") == FILES and len(hub.commits) == 1


def test_dropped_commit_is_retried_by_the_xet_pipeline(hub, api, tmp_path, monkeypatch):
    # With hf_xet installed, upload_folder goes through _upload_pipeline, which POSTs the commit through
    # http_backoff: a dropped connection is retried after 1 s, and the retry goes through.
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    api.create_repo("org/model")
    hub.drop_next_commit = True
    info = api.upload_folder(repo_id="org/model", folder_path=write_folder(tmp_path, FILES))
    assert len(commit_posts(hub)) == 2 and len(hub.commits) == 1
    assert hub.files("org/model") == FILES and api.model_info("org/model").sha == info.oid


def test_transformers_loads_a_config_through_the_server(hub, api, tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    api.create_repo("org/tiny-gpt2")
    api.upload_folder(repo_id="org/tiny-gpt2", folder_path=tmp_path / "gpt2")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf-home"))
    code = textwrap.dedent("""
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained("org/tiny-gpt2")
        print(config.model_type, config.n_layer)
    """)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["gpt2", "1"]
    # transformers first resolves "main" to a commit (repo_info), then fetches files at that commit.
    sha = api.model_info("org/tiny-gpt2").sha
    assert ("GET", "/api/models/org/tiny-gpt2") in hub.requests
    assert ("GET", f"/org/tiny-gpt2/resolve/{sha}/config.json") in hub.requests

"""Shared fixtures: tiny random CLIP + GPT-2 with real tokenizers, built offline; no network, temporary HF_HOME."""

import os
import tempfile

# Before transformers / huggingface_hub are imported anywhere: offline, no telemetry, a throwaway cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="maccap-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_maccap import MacCapForConditionalGeneration, MacCapProcessor  # noqa: E402
from modeling_maccap.tools.tiny import TINY_MACCAP, build_tiny_components  # noqa: E402

from .hub_server import FakeHub  # noqa: E402

TOKEN = "hf_test_token"


@pytest.fixture(scope="session")
def components(tmp_path_factory):
    """(clip_dir, lm_dir): tiny CLIP and GPT-2 checkpoint folders."""
    return build_tiny_components(tmp_path_factory.mktemp("components"))


@pytest.fixture
def make_model(components):
    """Build a tiny MacCap from the component folders; keyword arguments set MacCapConfig fields."""
    clip_dir, lm_dir = components

    def make(**config):
        model = MacCapForConditionalGeneration.from_pretrained_components(clip=clip_dir, lm=lm_dir,
                                                                          **{**TINY_MACCAP, **config})
        return model.eval()

    return make


@pytest.fixture
def model(make_model):
    return make_model()


@pytest.fixture
def processor(components):
    return MacCapProcessor.from_pretrained_components(clip=components[0], lm=components[1])


@pytest.fixture
def checkpoint(model, processor, tmp_path):
    """`model` and `processor` saved together: a folder like the one training writes."""
    folder = tmp_path / "maccap-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def random_image(seed, size=(48, 40)):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture
def images():
    """Three different random RGB images of different sizes."""
    return [random_image(0), random_image(1, (64, 30)), random_image(2, (20, 50))]


@pytest.fixture
def hub(monkeypatch):
    """A stand-in Hub; huggingface_hub in this process talks to it, online, with a valid token."""
    import huggingface_hub

    with FakeHub(tokens=(TOKEN,)) as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server

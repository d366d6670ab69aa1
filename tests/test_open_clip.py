"""open_clip -> HF CLIP: the converted towers compute what open_clip computes, the preprocessing gives the same
pixel_values, the tokenizer the same ids (open_clip's own random init; nothing is downloaded)."""

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from modeling_maccap import MacCapForConditionalGeneration, MacCapProcessor  # noqa: E402
from modeling_maccap.tools.open_clip_conversion import clip_model_from_open_clip, load_processors  # noqa: E402
from modeling_maccap.tools.tiny import TINY_MACCAP  # noqa: E402

from .conftest import random_image  # noqa: E402

TEXTS = ["a dog runs on the grass", "Two CUPS of coffee, on a wooden table!", "  odd   spacing  ", "café 1234 #$%"]


def reduced_open_clip(arch, quick_gelu, layers=2, seed=0):
    """open_clip's own architecture config for `arch`, with fewer layers so the test stays fast."""
    cfg = open_clip.get_model_config(arch)
    torch.manual_seed(seed)
    return open_clip.model.CLIP(cfg["embed_dim"], {**cfg["vision_cfg"], "layers": layers},
                                {**cfg["text_cfg"], "layers": layers}, quick_gelu=quick_gelu).eval()


@pytest.mark.parametrize("arch, quick_gelu", [("ViT-B-32", True), ("ViT-B-16", False), ("ViT-L-14", True),
                                              ("ViT-H-14", False)])
def test_converted_towers_match_open_clip_within_1e_5(arch, quick_gelu):
    reference = reduced_open_clip(arch, quick_gelu)
    converted = clip_model_from_open_clip(reference).eval()
    vision = converted.config.vision_config
    assert (vision.hidden_size, vision.patch_size, vision.image_size) == (
        reference.visual.conv1.out_channels, reference.visual.conv1.kernel_size[0], reference.visual.image_size[0])
    assert vision.hidden_act == ("quick_gelu" if quick_gelu else "gelu")

    pixels = torch.randn(2, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(1))
    _, tokenizer = load_processors(f"open_clip:{arch}")
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")  # padded as the processor pads, with a mask
    with torch.no_grad():
        torch.testing.assert_close(converted.get_image_features(pixel_values=pixels).pooler_output,
                                   reference.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(converted.get_text_features(**tokens).pooler_output,
                                   reference.encode_text(open_clip.tokenize(TEXTS)), atol=1e-5, rtol=0)


def test_tokenizer_gives_open_clips_ids():
    _, tokenizer = load_processors("open_clip:ViT-B-32")
    for text in TEXTS:
        ids = open_clip.tokenize([text])[0]
        assert tokenizer(text)["input_ids"] == ids[ids != 0].tolist()


@pytest.fixture(scope="module")
def open_clip_preprocess():
    return open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)[2]


@pytest.mark.parametrize("size, mode", [((640, 480), "RGB"), ((300, 501), "RGB"), ((225, 224), "L"),
                                        ((97, 333), "RGBA"), ((224, 224), "RGB"), ((300, 200), "RGB")])
def test_image_preprocessing_gives_open_clips_pixel_values(open_clip_preprocess, size, mode):
    image_processor, _ = load_processors("open_clip:ViT-B-32")
    image = random_image(sum(size), size).convert(mode)
    got = image_processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, open_clip_preprocess(image), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(200, 260), (260, 200), (224, 227)])
def test_center_crop_is_one_pixel_earlier_when_the_margin_is_3_mod_4(open_clip_preprocess, size):
    """transformers' center crop starts at floor(margin / 2), torchvision's (open_clip's) at round(margin / 2),
    Python's round-half-to-even: they differ by one pixel exactly when the margin is 3 mod 4 (200x260 resizes to
    224x291: margin 67). This is also how transformers' own CLIP checkpoints differ from OpenAI's preprocessing."""
    image_processor, _ = load_processors("open_clip:ViT-B-32")
    image = random_image(sum(size), size)
    got = image_processor(image, return_tensors="pt")["pixel_values"][0]
    expected = open_clip_preprocess(image)
    if size[1] > size[0]:
        torch.testing.assert_close(got[:, 1:], expected[:, :-1], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(got[:, :, 1:], expected[:, :, :-1], atol=1e-5, rtol=0)
    assert (got - expected).abs().max() > 0.01


def test_pretrained_tags_bring_their_own_normalisation():
    image_processor, _ = load_processors("open_clip:ViT-B-16/datacomp_xl_s13b_b90k")
    expected = open_clip.get_pretrained_cfg("ViT-B-16", "datacomp_xl_s13b_b90k")
    assert tuple(image_processor.image_mean) == pytest.approx(expected.get("mean", open_clip.OPENAI_DATASET_MEAN))
    assert tuple(image_processor.image_std) == pytest.approx(expected.get("std", open_clip.OPENAI_DATASET_STD))


def test_open_clip_spec_builds_maccap_with_open_clips_tower_and_preprocessing(components, open_clip_preprocess):
    torch.manual_seed(3)
    reference = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.manual_seed(3)  # the same random initialisation inside from_pretrained_components
    model = MacCapForConditionalGeneration.from_pretrained_components(clip="open_clip:ViT-B-32", lm=components[1],
                                                                      **TINY_MACCAP).eval()
    assert isinstance(model.processor, MacCapProcessor)
    images = [random_image(7, (320, 240)), random_image(8, (200, 300))]  # margins 74 and 112: crops agree
    pixel_values = model.processor(images=images)["pixel_values"]
    torch.testing.assert_close(pixel_values, torch.stack([open_clip_preprocess(im) for im in images]), atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = F.normalize(reference.eval().encode_image(pixel_values), dim=-1)
        got = model.get_subregion_features(pixel_values).image_embeds
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert model.generate(**model.processor(images=images)).shape[0] == 2


@pytest.mark.parametrize("spec", ["open_clip:RN50", "open_clip:convnext_base", "open_clip:ViT-SO400M-14-SigLIP"])
def test_architectures_that_do_not_map_are_refused(spec, components):
    with pytest.raises(ValueError, match="does not map onto HF CLIP; supported: ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14"):
        MacCapForConditionalGeneration.from_pretrained_components(clip=spec, lm=components[1], **TINY_MACCAP)


def test_a_vit_with_attentional_pooling_is_refused():
    cfg = open_clip.get_model_config("ViT-B-32")
    model = open_clip.model.CLIP(cfg["embed_dim"], {**cfg["vision_cfg"], "layers": 1, "attentional_pool": True},
                                 {**cfg["text_cfg"], "layers": 1})
    with pytest.raises(ValueError, match="not a plain ViT with CLS pooling"):
        clip_model_from_open_clip(model)


def test_without_the_converter_an_open_clip_spec_says_what_to_install(components, monkeypatch):
    """Remote code never imports open_clip: the installed maccap package registers its converter as a CLIP source;
    remote code on its own (no source registered) names what to install."""
    from modeling_maccap import processing_maccap

    monkeypatch.setattr(processing_maccap, "CLIP_SOURCES", {})
    for load in (MacCapProcessor.from_pretrained_components, MacCapForConditionalGeneration.from_pretrained_components):
        with pytest.raises(ImportError, match=r"open_clip:ViT-B-32: .* pip install 'maccap\[open_clip\]'"):
            load(clip="open_clip:ViT-B-32", lm=components[1])

"""MacCapProcessor: image loading and preprocessing, prompts, training batches, caption cleaning, save/load.

Expectations are built independently in each test (images drawn by hand, the tokenizers called directly,
CLIP's normalisation written out), never taken from the processor's own output.
"""

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_maccap import MacCapProcessor, clean_caption
from modeling_maccap.tools.tiny import tiny_image_processor

from .conftest import random_image

SIDE = 32  # the tiny image processor's crop


# ------------------------------------------------------------------------------------------------ helpers
def pixels(processor, images):
    return processor(images=images)["pixel_values"]


def solid_pixels(processor, rgb, n=1):
    """CLIP normalisation of a solid colour, written out: (value / 255 - mean) / std on every pixel."""
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    one = (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
    return one.expand(3, SIDE, SIDE).unsqueeze(0).expand(n, 3, SIDE, SIDE)


def rgb_of(array):
    """An RGB PIL image from an HxWx3 uint8 array."""
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3
    return Image.fromarray(array)


def random_array(seed, shape=(40, 48, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def bos_id(tokenizer):
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def lm_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def with_max_length(processor, n):
    return MacCapProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                           clip_tokenizer=processor.clip_tokenizer, max_caption_length=n)


def one_level(processor):
    """One 8-bit step after CLIP normalisation, in the channel where it is largest."""
    return 1 / 255 / min(processor.image_processor.image_std)


# ------------------------------------------------------------------------------- 1. image inputs (PIL)
def test_pixel_values_have_one_32px_rgb_plane_per_image(processor, images):
    out = pixels(processor, images)
    assert out.shape == (len(images), 3, SIDE, SIDE)
    assert out.dtype == torch.float32


def test_solid_colour_is_normalised_with_clip_mean_and_std(processor):
    assert torch.allclose(pixels(processor, Image.new("RGB", (50, 40), (200, 30, 90))),
                          solid_pixels(processor, (200, 30, 90)), atol=1e-5)


def test_grayscale_equals_the_same_gray_as_rgb(processor):
    gray = random_array(3, (40, 48))
    assert torch.equal(pixels(processor, Image.fromarray(gray)),  # mode "L"
                       pixels(processor, rgb_of(np.stack([gray] * 3, axis=-1))))


def test_fully_transparent_rgba_is_composited_on_white(processor):
    rgba = np.concatenate([random_array(4), np.zeros((40, 48, 1), np.uint8)], axis=-1)
    image = Image.fromarray(rgba)
    assert image.mode == "RGBA"
    assert torch.equal(pixels(processor, image), pixels(processor, Image.new("RGB", (48, 40), "white")))


def test_fully_transparent_gray_alpha_is_white(processor):
    image = Image.new("LA", (30, 30), (40, 0))
    assert torch.equal(pixels(processor, image), pixels(processor, Image.new("RGB", (30, 30), (255, 255, 255))))


def test_opaque_rgba_equals_its_rgb(processor):
    rgb = random_array(5)
    rgba = np.concatenate([rgb, np.full((40, 48, 1), 255, np.uint8)], axis=-1)
    assert torch.equal(pixels(processor, Image.fromarray(rgba)), pixels(processor, rgb_of(rgb)))


def test_palette_image_equals_its_colours_looked_up_by_hand(processor):
    palette = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0], [255, 255, 255]], np.uint8)
    index = np.random.default_rng(6).integers(0, 4, (40, 48), dtype=np.uint8)
    image = Image.frombytes("P", (48, 40), index.tobytes())
    image.putpalette(palette.flatten().tolist())
    assert torch.equal(pixels(processor, image), pixels(processor, rgb_of(palette[index])))


def test_palette_transparent_index_is_white(processor):
    palette = np.array([[10, 20, 30], [200, 100, 50]], np.uint8)
    index = np.random.default_rng(7).integers(0, 2, (40, 48), dtype=np.uint8)
    image = Image.frombytes("P", (48, 40), index.tobytes())
    image.putpalette(palette.flatten().tolist())
    image.info["transparency"] = 1
    expected = np.where(index[..., None] == 1, np.uint8(255), palette[index])
    assert torch.equal(pixels(processor, image), pixels(processor, rgb_of(expected)))


def test_cmyk_primaries_become_their_rgb_colours(processor):
    cmyk = np.zeros((40, 48, 4), np.uint8)  # top-left: no ink = white
    cmyk[:20, 24:] = (255, 0, 0, 0)  # cyan ink
    cmyk[20:, :24] = (0, 255, 255, 0)  # magenta + yellow = red
    cmyk[20:, 24:] = (0, 0, 0, 255)  # black
    rgb = np.full((40, 48, 3), 255, np.uint8)
    rgb[:20, 24:] = (0, 255, 255)
    rgb[20:, :24] = (255, 0, 0)
    rgb[20:, 24:] = (0, 0, 0)
    image = Image.frombytes("CMYK", (48, 40), cmyk.tobytes())
    assert torch.equal(pixels(processor, image), pixels(processor, rgb_of(rgb)))


@pytest.mark.parametrize("value, rgb", [(65535, (255, 255, 255)), (0, (0, 0, 0))])
def test_16_bit_extremes_are_white_and_black(processor, value, rgb):
    image = Image.fromarray(np.full((20, 30), value, np.uint16))
    assert image.mode == "I;16"
    assert torch.equal(pixels(processor, image), pixels(processor, Image.new("RGB", (30, 20), rgb)))


def test_16_bit_half_white_half_black(processor):
    array = np.zeros((20, 30), np.uint16)
    array[:, 15:] = 65535
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, 15:] = 255
    assert torch.equal(pixels(processor, Image.fromarray(array)), pixels(processor, rgb_of(rgb)))


def test_dark_16_bit_image_stays_dark(processor):
    """16-bit value 200 is 200/65535 of full scale: at most one 8-bit level, as the numpy uint16 path gives."""
    image = Image.fromarray(np.full((20, 30), 200, np.uint16))
    assert image.mode == "I;16"
    assert (pixels(processor, image) <= solid_pixels(processor, (1, 1, 1)) + 1e-5).all()


def test_one_pixel_image_is_upscaled_to_a_solid_square(processor):
    out = pixels(processor, Image.new("RGB", (1, 1), (12, 240, 77)))
    assert out.shape == (1, 3, SIDE, SIDE)
    assert torch.allclose(out, solid_pixels(processor, (12, 240, 77)), atol=1e-5)


def test_huge_image_is_resized_and_captioned(processor, model):
    big = Image.new("RGB", (6000, 6000), (120, 30, 200))
    inputs = processor(images=big)
    assert inputs["pixel_values"].shape == (1, 3, SIDE, SIDE)
    assert torch.isfinite(inputs["pixel_values"]).all()
    assert torch.allclose(inputs["pixel_values"], solid_pixels(processor, (120, 30, 200)), atol=1e-5)
    ids = model.generate(**inputs, rerank=False)
    assert ids.dim() == 2 and ids.shape[0] == 1 and ids.shape[1] >= 1
    assert ids[0, 0].item() == bos_id(processor.tokenizer)  # the prompt comes first


# ------------------------------------------------------------------------------ 1. image inputs (numpy)
def test_uint8_rgb_array_equals_the_pil_image(processor):
    array = random_array(8)
    assert torch.equal(pixels(processor, array), pixels(processor, rgb_of(array)))


def test_uint8_2d_array_is_gray(processor):
    gray = random_array(9, (40, 48))
    assert torch.equal(pixels(processor, gray), pixels(processor, rgb_of(np.stack([gray] * 3, axis=-1))))


def test_uint8_rgba_array_with_zero_alpha_is_white(processor):
    rgba = np.concatenate([random_array(10), np.zeros((40, 48, 1), np.uint8)], axis=-1)
    assert torch.equal(pixels(processor, rgba), pixels(processor, Image.new("RGB", (48, 40), "white")))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_array_in_unit_range_equals_uint8_times_255(processor, dtype):
    array = random_array(11)
    assert torch.equal(pixels(processor, (array / 255).astype(dtype)), pixels(processor, rgb_of(array)))


def test_uint16_array_is_scaled_to_8_bits(processor):
    array = random_array(12)
    assert torch.equal(pixels(processor, array.astype(np.uint16) * 257), pixels(processor, rgb_of(array)))
    white16 = np.full((20, 30, 3), 65535, np.uint16)
    assert torch.equal(pixels(processor, white16), pixels(processor, Image.new("RGB", (30, 20), "white")))


@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan], ids=["above-1", "negative", "nan"])
def test_float_array_outside_unit_range_is_rejected(processor, bad):
    array = np.full((10, 10, 3), 0.5, np.float32)
    array[3, 4, 1] = bad
    with pytest.raises(ValueError, match="image 0"):
        processor(images=array)


def test_float_array_in_0_255_is_rejected(processor):
    """A common mistake: floats that still hold 8-bit values."""
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(images=random_array(13).astype(np.float32))


@pytest.mark.parametrize("view", ["bgr-to-rgb", "flipped", "big-endian"])
def test_any_valid_numpy_layout_is_accepted(processor, view):
    array = random_array(14)
    if view == "bgr-to-rgb":
        image = array[..., ::-1]
    elif view == "flipped":
        image = np.flipud(array)
    else:
        image = (array.astype(np.uint16) * 257).astype(">u2")
    assert torch.equal(pixels(processor, image), pixels(processor, rgb_of(np.ascontiguousarray(
        array if view == "big-endian" else image))))


# --------------------------------------------------------------------------------- 1. image inputs (paths)
@pytest.mark.parametrize("as_path", [str, pathlib.Path], ids=["str", "pathlib"])
def test_png_path_equals_the_image_in_memory(processor, tmp_path, as_path):
    image = random_image(15)
    image.save(tmp_path / "photo.png")
    assert torch.equal(pixels(processor, as_path(tmp_path / "photo.png")), pixels(processor, image))


def test_mixed_list_keeps_image_order(processor, tmp_path):
    first, second, third = random_array(16), random_array(17, (30, 64, 3)), random_array(18, (50, 20, 3))
    rgb_of(first).save(tmp_path / "first.png")
    out = pixels(processor, [str(tmp_path / "first.png"), rgb_of(second), third])
    for i, array in enumerate([first, second, third]):
        assert torch.equal(out[i:i + 1], pixels(processor, rgb_of(array)))


# ---------------------------------------------------------------------------------------- 2. bad images
def raises_one_error(processor, images):
    """The ValueError a call raises; it must stand alone (no chained traceback from PIL or torch)."""
    with pytest.raises(ValueError) as info:
        processor(images=images)
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return str(error)


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_is_named_and_called_truncated(processor, tmp_path, fmt, suffix):
    path = tmp_path / f"cut.{suffix}"
    random_image(19, (64, 64)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = raises_one_error(processor, str(path))
    assert str(path) in message
    assert "truncated" in message or "corrupt" in message


def test_lazily_opened_truncated_image_is_reported(processor, tmp_path):
    path = tmp_path / "cut.png"
    random_image(20, (64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with Image.open(path) as lazy:  # header read, pixels not yet decoded
        message = raises_one_error(processor, lazy)
    assert "image 0" in message and ("truncated" in message or "corrupt" in message)


def test_text_file_is_not_an_image(processor, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a dog on the grass\n")
    message = raises_one_error(processor, path)
    assert str(path) in message and "not an image" in message


def test_missing_path_is_no_such_file(processor, tmp_path):
    path = tmp_path / "missing.png"
    message = raises_one_error(processor, str(path))
    assert str(path) in message and "no such file" in message


@pytest.mark.parametrize("thing", [5, None, b"\x89PNG", torch.zeros(3, 8, 8)], ids=["int", "none", "bytes", "tensor"])
def test_wrong_type_is_unsupported(processor, thing):
    message = raises_one_error(processor, [thing])
    assert "unsupported type" in message and type(thing).__name__ in message


def test_bad_second_image_is_named_by_its_index(processor, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    message = raises_one_error(processor, [random_image(21), str(path), random_image(22)])
    assert "image 1" in message and str(path) in message


def test_wrong_type_second_image_is_named_by_its_index(processor):
    assert "image 1" in raises_one_error(processor, [random_image(23), 7])


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 4, 2), (2, 4, 4, 3), ()], ids=["empty", "2-channel", "4d", "0d"])
def test_array_of_no_image_shape_is_rejected(processor, shape):
    assert "image 0" in raises_one_error(processor, np.zeros(shape, np.uint8))


def test_neither_images_nor_text_is_rejected(processor):
    with pytest.raises(ValueError):
        processor()


# ------------------------------------------------------------------------------ 3. images (+ prompts)
def test_images_without_text_get_a_bos_prompt(processor, images):
    out = processor(images=images)
    bos = bos_id(processor.tokenizer)
    assert out["input_ids"].tolist() == [[bos]] * len(images)
    assert out["attention_mask"].tolist() == [[1]] * len(images)


def test_prompts_are_bos_plus_tokens_left_padded(processor, images):
    tok = processor.tokenizer
    prompts = ["a photo of", "a dog", "a red cat with a blue"]
    rows = [[bos_id(tok)] + lm_ids(tok, p) for p in prompts]
    width = max(map(len, rows))
    expected_ids = [[tok.pad_token_id] * (width - len(r)) + r for r in rows]
    expected_mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    assert len({len(r) for r in rows}) == 3  # the padding is really exercised
    out = processor(images=images, text=prompts)
    assert out["input_ids"].tolist() == expected_ids
    assert out["attention_mask"].tolist() == expected_mask
    assert torch.equal(out["pixel_values"], pixels(processor, images))


def test_single_prompt_is_shared_by_all_images(processor, images):
    tok = processor.tokenizer
    row = [bos_id(tok)] + lm_ids(tok, "a photo of")
    for text in ["a photo of", ["a photo of"]]:
        out = processor(images=images, text=text)
        assert out["input_ids"].tolist() == [row] * len(images)
        assert out["attention_mask"].tolist() == [[1] * len(row)] * len(images)


def test_prompt_count_must_match_image_count(processor, images):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        processor(images=images, text=["a photo of", "the"])


# ------------------------------------------------------------------------------ 4. text only (training)
def test_training_batch_is_bos_caption_eos_right_padded(processor):
    tok = processor.tokenizer
    captions = ["  a dog on the grass ", "the red cat on the table with a blue man", "photo"]
    rows = [[bos_id(tok)] + lm_ids(tok, c.strip()) + [tok.eos_token_id] for c in captions]
    width = max(map(len, rows))
    out = processor(text=captions)
    assert out["input_ids"].tolist() == [r + [tok.pad_token_id] * (width - len(r)) for r in rows]
    assert out["attention_mask"].tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    assert out["labels"].tolist() == [[-100] + r[1:] + [-100] * (width - len(r)) for r in rows]


def test_clip_tokens_are_the_clip_tokenizer_of_the_stripped_captions(processor):
    captions = ["a dog on the grass", "the red cat on the table with a blue man"]
    expected = processor.clip_tokenizer(captions, padding=True, return_tensors="pt")
    out = processor(text=[" " + c + "  " for c in captions])
    assert torch.equal(out["clip_input_ids"], expected["input_ids"])
    assert torch.equal(out["clip_attention_mask"], expected["attention_mask"])


def test_long_caption_is_cut_to_max_length_without_eos(processor):
    tok = processor.tokenizer
    short = with_max_length(processor, 3)
    caption = "the red cat on the table"
    tokens = lm_ids(tok, caption)
    assert len(tokens) > 3
    out = short(text=[caption])
    assert out["input_ids"].tolist() == [[bos_id(tok)] + tokens[:3]]
    assert out["labels"].tolist() == [[-100] + tokens[:3]]


def test_caption_of_exactly_max_length_keeps_its_eos(processor):
    tok = processor.tokenizer
    caption = "a dog on"
    tokens = lm_ids(tok, caption)
    out = with_max_length(processor, len(tokens))(text=[caption])
    assert out["input_ids"].tolist() == [[bos_id(tok)] + tokens + [tok.eos_token_id]]


@pytest.mark.parametrize("captions, index", [(["a dog", ""], 1), (["   \t\n"], 0), (["a dog", "the cat", "  "], 2)])
def test_empty_caption_is_named_by_index(processor, captions, index):
    with pytest.raises(ValueError, match=f"caption {index} is empty"):
        processor(text=captions)


def test_caption_bytes_that_are_not_utf8_are_rejected(processor):
    with pytest.raises(ValueError, match="UTF-8") as info:
        processor(text=["a dog", b"\xff\xfe"])
    assert "caption 1" in str(info.value)


def test_prompt_bytes_that_are_not_utf8_are_rejected(processor, images):
    with pytest.raises(ValueError, match="UTF-8"):
        processor(images=images[:1], text=[b"\xff\xfe"])


def test_utf8_caption_bytes_equal_the_string(processor):
    text = "a dög on the grass"
    as_bytes, as_str = processor(text=[text.encode("utf-8")]), processor(text=[text])
    assert as_bytes.keys() == as_str.keys()
    for key in as_str:
        assert torch.equal(as_bytes[key], as_str[key])


@pytest.mark.parametrize("thing", [5, None, ["a dog"]], ids=["int", "none", "list"])
def test_non_string_caption_is_rejected(processor, thing):
    with pytest.raises(ValueError, match="caption 1"):
        processor(text=["a dog", thing])


# ---------------------------------------------------------------------------------- 5. caption cleaning
@pytest.mark.parametrize("raw, clean", [
    ("a dog on the grass", "a dog on the grass"),
    ("a dog!! on  the grass...", "a dog on the grass."),
    ("  Hello,   World 42 ", "Hello, World 42"),
    ("a ! b", "a b"),  # removing a character can leave a double space, which is collapsed too
    ("end.!.", "end."),  # and can leave repeated periods
    ("café, naïve", "caf, nave"),
    ("tab\there\nnewline", "tabherenewline"),
    ("#$%&*", ""),
    ("", ""),
    # The reference's other steps (its clean_func): what follows the last "Answer:", no "<PAD>", no 4-digit runs.
    ("Question: what is it? Answer: a cat", "a cat"),
    ("Answer: one Answer:  two dogs", "two dogs"),
    ("a <PAD><PAD>dog<PAD>", "a dog"),
    ("a photo from 2012 of a dog", "a photo from  of a dog"),  # the double space stays, as the reference leaves it
    ("12345 cats and 123 dogs", "5 cats and 123 dogs"),
    ("19,99.. 1999", "19,99."),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_batch_decode_drops_special_tokens_and_cleans(processor):
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    first = lm_ids(tok, "a dog!! on  the grass...") + [eot]
    second = [eot] + lm_ids(tok, "the   red cat??") + [eot, eot]
    assert processor.batch_decode([first, second]) == ["a dog on the grass.", "the red cat"]
    assert processor.decode(first) == "a dog on the grass."


def test_batch_decode_accepts_a_padded_tensor(processor):
    tok = processor.tokenizer
    rows = [lm_ids(tok, "a photo of a man..."), lm_ids(tok, "grass")]
    width = max(map(len, rows))
    batch = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    assert processor.batch_decode(batch) == ["a photo of a man.", "grass"]


# ----------------------------------------------------------------------------------- 6. save and load
def test_save_and_load_round_trip(processor, tmp_path, images):
    original = with_max_length(processor, 7)
    original.save_pretrained(tmp_path / "processor")
    loaded = MacCapProcessor.from_pretrained(tmp_path / "processor")
    assert loaded.max_caption_length == 7
    for text in ["a dog on the grass", "The RED cat, with a blue man!", "ünïcode  spaces"]:
        assert lm_ids(loaded.tokenizer, text) == lm_ids(original.tokenizer, text)
        assert loaded.clip_tokenizer(text)["input_ids"] == original.clip_tokenizer(text)["input_ids"]
    assert loaded.tokenizer.pad_token_id == original.tokenizer.pad_token_id
    assert torch.equal(pixels(loaded, images), pixels(original, images))
    long_caption = ["the red cat on the table with a blue man on the grass"]
    assert torch.equal(loaded(text=long_caption)["input_ids"], original(text=long_caption)["input_ids"])


# -------------------------------------------------------------------------------- 7. image backends
def gradient_image(width=97, height=71):
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    rgb = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1)
    return rgb_of((rgb * 255).round().astype(np.uint8))


@pytest.mark.parametrize("image", [gradient_image(), random_image(24)], ids=["gradient", "noise"])
def test_pil_and_torchvision_backends_agree_within_one_8_bit_level(processor, image):
    def build(backend):
        return MacCapProcessor(image_processor=tiny_image_processor(backend), tokenizer=processor.tokenizer,
                               clip_tokenizer=processor.clip_tokenizer)

    with_pil, with_torchvision = pixels(build("pil"), image), pixels(build("torchvision"), image)
    assert with_pil.shape == with_torchvision.shape == (1, 3, SIDE, SIDE)
    assert (with_pil - with_torchvision).abs().max() <= one_level(processor) * 1.001


def test_exif_orientation_is_applied_to_files(processor, tmp_path):
    """A photo stored sideways with EXIF Orientation=6 (rotate 90 degrees clockwise) is read upright."""
    upright = Image.new("RGB", (40, 20), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, right half red
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 20 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=100)
    from_file = pixels(processor, str(path))
    assert from_file.shape == (1, 3, SIDE, SIDE)
    # Upright, the left half is blue and the right half red; read sideways it would be top/bottom.
    left, right = from_file[0, :, :, : SIDE // 2].mean((1, 2)), from_file[0, :, :, SIDE // 2 :].mean((1, 2))
    assert left[2] > left[0] and right[0] > right[2]


def test_float_image_in_unit_range_is_scaled(processor):
    """A mode-"F" PIL image holding [0, 1] values reads like the same values times 255."""
    values = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    expected = Image.fromarray((values * 255).round().astype(np.uint8)).convert("RGB")
    assert torch.allclose(pixels(processor, Image.fromarray(values, mode="F")), pixels(processor, expected), atol=0.02)


def test_every_odd_image_captions_in_one_batch(model, processor, tmp_path):
    """Grayscale, RGBA, CMYK, palette, 16-bit, 1x1 and a file on disk go through generate() together."""
    odd = [
        Image.new("L", (30, 20), 90),
        Image.new("RGBA", (25, 25), (10, 200, 30, 128)),
        Image.new("CMYK", (20, 30), (0, 255, 255, 0)),
        Image.new("RGB", (40, 30), (5, 100, 200)).convert("P"),
        Image.fromarray(np.full((20, 20), 40000, np.uint16)),
        Image.new("RGB", (1, 1), (255, 0, 0)),
    ]
    path = tmp_path / "photo.jpg"
    random_image(3).save(path)
    out = model.generate(**processor(images=odd + [str(path)]), output_candidates=True)
    assert out.sequences.shape[0] == 7 and out.candidates.shape[:2] == (7, 4)
    assert torch.isfinite(out.candidate_scores).all()
    assert (out.sequences[:, 0] == processor.tokenizer.eos_token_id).all()  # [BOS | caption]; BOS is EOS in GPT-2

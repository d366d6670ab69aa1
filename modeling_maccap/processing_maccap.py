"""MacCap processor: CLIP image processor, LM tokenizer (primary), CLIP tokenizer; caption cleaning."""

from .transformers_compat import PIL, image_processor_with_backend  # first: checks the transformers version

import os  # noqa: I001
import re

import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

Image = PIL.Image


def clean_caption(text):
    """The reference's output cleaning, in its order: keep what follows the last "Answer:", drop "<PAD>", keep
    [a-zA-Z0-9 ,.], collapse spaces and repeated periods, then drop each run of four digits (the spaces around one
    stay, as in the reference), and strip."""
    if "Answer:" in text:
        text = text.split("Answer:")[-1]
    text = text.replace("<PAD>", "")
    text = re.sub(r"[^a-zA-Z0-9 ,.]", "", text)
    text = re.sub(r" +", " ", text)
    text = re.sub(r"\.+", ".", text)
    text = re.sub(r"[0-9]{4}", "", text)
    return text.strip()


def _describe(image, index):
    return f"image {index} ({image})" if isinstance(image, (str, os.PathLike)) else f"image {index}"


def _to_rgb(image):
    """Any PIL mode to 8-bit RGB. 16-bit greyscale is scaled by 1/257 (65535 -> 255); 32-bit integer greyscale
    too when it exceeds 255; float greyscale in [0, 1] is scaled by 255. Transparency is laid on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        mode, hi = image.mode, image.getextrema()[1]
        scale = 1 / 257.0 if mode.startswith("I;16") or hi > 255 else 255.0 if mode == "F" and hi <= 1.0 else 1.0
        # F -> L truncates and clamps to [0, 255]: add 0.5 to round.
        image = image.convert("F").point(lambda v: v * scale + 0.5).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(image, index=0):
    """A PIL image, a numpy array (HxW or HxWxC; uint8, uint16, bool or float in [0, 1]) or a file path, as RGB
    (EXIF orientation applied). Anything unusable raises one ValueError naming the image and what is wrong."""
    name = _describe(image, index)
    if type(image).__module__ == "numpy":
        return _to_rgb(_array_to_pil(image, name))
    try:
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                opened.load()  # decode now, so a truncated file fails here and not later
                return _to_rgb(PIL.ImageOps.exif_transpose(opened))
        if isinstance(image, Image.Image):
            image.load()
            return _to_rgb(PIL.ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file (or a format PIL cannot read)") from None
    except (OSError, SyntaxError) as err:  # truncated or corrupt data
        raise ValueError(f"{name}: corrupt or truncated image ({err})") from None
    raise ValueError(f"{name}: unsupported type {type(image).__name__} (give a PIL image, numpy array or path)")


def _array_to_pil(image, name):
    """A numpy image to PIL (through torch, any strides or byte order); 16-bit and [0, 1] float values are
    rescaled to 8 bits."""
    shape = tuple(image.shape)
    if len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (3, 4)) or 0 in shape:
        raise ValueError(f"{name}: array of shape {tuple(image.shape)} is not an HxW, HxWx3 or HxWx4 image")
    try:  # native byte order, C-contiguous: what torch and PIL accept
        array = torch.as_tensor(image.astype(image.dtype.newbyteorder("="), order="C")).reshape(shape)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: unsupported array dtype {image.dtype}") from None
    if array.dtype == torch.bool:
        array = array.to(torch.uint8) * 255
    elif array.dtype == torch.uint16:
        array = (array.to(torch.float32) / 257.0).round().to(torch.uint8)
    elif array.dtype.is_floating_point:
        array = array.to(torch.float32)
        if not torch.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name}: float arrays must hold finite values in [0, 1]")
        array = (array * 255).round().to(torch.uint8)
    elif array.dtype != torch.uint8:
        raise ValueError(f"{name}: unsupported array dtype {image.dtype}")
    return Image.fromarray(array.numpy())


def _as_list(items):
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _check_text(texts, what):
    checked = []
    for i, text in enumerate(texts):
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{what} {i} is not valid UTF-8") from None
        if not isinstance(text, str):
            raise ValueError(f"{what} {i} must be a string, got {type(text).__name__}")
        checked.append(text)
    return checked


# CLIP checkpoints named by a spec string rather than a Hub id or folder, by prefix: prefix -> (load_model(spec,
# dtype), load_processors(spec) -> (image processor, CLIP tokenizer)). The installed maccap package registers
# "open_clip:" (modeling_maccap.tools.open_clip_conversion); remote code on its own knows none.
CLIP_SOURCES = {}
OPEN_CLIP_PREFIX = "open_clip:"


def register_clip_source(prefix, load_model, load_processors):
    CLIP_SOURCES[prefix] = (load_model, load_processors)


def clip_source(clip):
    """The registered (load_model, load_processors) of a CLIP spec such as "open_clip:ViT-B-32/openai"; None for a
    Hub id or folder."""
    if not isinstance(clip, str):
        return None
    for prefix, source in CLIP_SOURCES.items():
        if clip.startswith(prefix):
            return source
    if clip.startswith(OPEN_CLIP_PREFIX):
        raise ImportError(f"{clip}: open_clip CLIP specs need the maccap package with open_clip: "
                          "pip install 'maccap[open_clip]'")
    return None


class MacCapProcessor(ProcessorMixin):
    r"""
    Images -> `pixel_values` plus the LM prompt (`input_ids`, left-padded, BOS first) for `generate`.
    Text alone -> the training batch: LM `input_ids` [BOS, caption, EOS] right-padded with `labels` (-100 on BOS
    and padding), and the CLIP tokenization `clip_input_ids` / `clip_attention_mask`.

    Args:
        image_processor: CLIP's image processor (PIL or torchvision backend).
        tokenizer: the LM's tokenizer (primary: used by `batch_decode`).
        clip_tokenizer: CLIP's tokenizer.
        max_caption_length (`int`, defaults to 25): LM tokens kept per training caption (BOS/EOS not counted).
        image_backend (`str`, *optional*): "pil" or "torchvision", the backend the image processor was
            built with (by default the given one's). Saved, so that a reloaded processor resizes exactly as the saved
            one did: a saved image processor config names no backend, and reloads on torchvision where it is installed.
    """

    def __init__(self, image_processor=None, tokenizer=None, clip_tokenizer=None, max_caption_length=25,
                 image_backend=None, **kwargs):
        self.max_caption_length = max_caption_length
        if image_processor is not None:
            if image_backend is None:
                image_backend = getattr(image_processor, "backend", None)
            else:
                image_processor = image_processor_with_backend(image_processor, image_backend)
        self.image_backend = image_backend
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padding is masked anyway
        super().__init__(image_processor, tokenizer, clip_tokenizer, **kwargs)

    @classmethod
    def from_pretrained_components(cls, clip, lm, **kwargs):
        """Build from a CLIP checkpoint (image processor, tokenizer) and a causal-LM checkpoint (tokenizer).
        `clip` may also be an open_clip spec, "open_clip:ARCH/TAG": open_clip's preprocessing and tokenizer."""
        source = clip_source(clip)
        if source is not None:
            image_processor, clip_tokenizer = source[1](clip)
        else:
            image_processor, clip_tokenizer = AutoImageProcessor.from_pretrained(clip), AutoTokenizer.from_pretrained(clip)
        return cls(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(lm),
                   clip_tokenizer=clip_tokenizer, **kwargs)

    @property
    def model_input_names(self):
        return ["pixel_values", "input_ids", "attention_mask"]

    @property
    def _bos_id(self):
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs):
        if images is None and text is None:
            raise ValueError("give images (to caption) or text (captions to train on)")
        if images is None:
            return self._tokenize_captions(_check_text(_as_list(text), "caption"), return_tensors)
        images = [load_image(image, i) for i, image in enumerate(_as_list(images))]
        pixel_values = self.image_processor(images, return_tensors="pt", **kwargs)["pixel_values"]
        prompts = [""] * len(images) if text is None else _check_text(_as_list(text), "prompt")
        if len(prompts) == 1 and len(images) > 1:
            prompts = prompts * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        input_ids, attention_mask = self.prompt_inputs(prompts)
        return BatchFeature({"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask},
                            tensor_type=return_tensors)

    def prompt_inputs(self, prompts):
        """(input_ids, attention_mask) of the text that follows the prefix in generation: BOS, then each prompt's
        tokens (none for plain captioning), left-padded."""
        ids = [[self._bos_id] + self.tokenizer(p, add_special_tokens=False)["input_ids"] if p else [self._bos_id]
               for p in prompts]
        return self._pad(ids, side="left")

    def _tokenize_captions(self, captions, return_tensors):
        clip = self.clip_text_inputs(captions)
        return BatchFeature({**self.caption_lm_inputs(captions), "clip_input_ids": clip["input_ids"],
                             "clip_attention_mask": clip["attention_mask"]}, tensor_type=return_tensors)

    def caption_lm_inputs(self, captions):
        """The LM side of a training batch: [BOS, caption tokens, EOS] right-padded, and labels that score the
        caption tokens and EOS only. (Training on cached CLIP text features needs nothing else.)"""
        for i, caption in enumerate(captions):
            if not caption.strip():
                raise ValueError(f"caption {i} is empty")
        tok = self.tokenizer
        ids = []
        for caption in captions:
            tokens = tok(caption.strip(), add_special_tokens=False)["input_ids"]
            # EOS only on a caption that fits: a cut caption should not teach the LM to stop mid-sentence.
            end = [tok.eos_token_id] if len(tokens) <= self.max_caption_length else []
            ids.append([self._bos_id] + tokens[: self.max_caption_length] + end)
        input_ids, attention_mask = self._pad(ids, side="right")
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, 0] = -100  # BOS is given, not predicted
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @property
    def clip_context_length(self):
        return min(self.clip_tokenizer.model_max_length, 77)

    def clip_text_inputs(self, texts):
        """CLIP tokens of `texts` (stripped, padded to the longest, cut at the CLIP context), as the CLIP text tower
        sees captions in training, in the feature cache and in reranking."""
        return self.clip_tokenizer([t.strip() for t in texts], padding=True, truncation=True,
                                   max_length=self.clip_context_length, return_tensors="pt")

    def _pad(self, ids, side):
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return input_ids, attention_mask

    def batch_decode(self, sequences, skip_special_tokens=True, **kwargs):
        """Decode with the LM tokenizer and apply the caption cleaning."""
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [clean_caption(text) for text in texts]

    def decode(self, sequence, skip_special_tokens=True, **kwargs):
        return self.batch_decode([sequence], skip_special_tokens=skip_special_tokens, **kwargs)[0]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


MacCapProcessor.register_for_auto_class()

__all__ = ["MacCapProcessor", "clean_caption", "load_image", "register_clip_source"]

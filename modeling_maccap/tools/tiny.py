"""Tiny random CLIP and GPT-2 checkpoints with real tokenizers, built offline (no hub access).

They stand in for `openai/clip-vit-base-patch32` and `gpt2` wherever weights cannot be downloaded: the tests,
`maccap selfcheck`. Same classes and file layout as the real checkpoints, a few thousand parameters.
"""

from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from transformers.utils.import_utils import is_torchvision_available

# Word pieces merged on top of the byte alphabet, so captions tokenize into a handful of tokens.
WORDS = ["a", "the", "dog", "cat", "red", "blue", "on", "in", "of", "photo", "man", "grass", "table", "with"]


def _byte_alphabet():
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _merge_words(vocab, words, marker, end=False):
    """BPE merges that build each of `words` from its letters, starting at its marked end: "Ġ" + letters left to
    right (Ġd, Ġdo, Ġdog), or letters right to left onto the last one + "</w>" (g</w>, og</w>, dog</w>). Every
    merge then holds the marker, so no word's merges can split another word."""
    merges = []

    def add(left, right):
        if left + right not in vocab:
            merges.append((left, right))
            vocab[left + right] = len(vocab)
        return left + right

    for word in words:
        if end:
            piece = word[-1] + marker
            for letter in reversed(word[:-1]):
                piece = add(letter, piece)
        else:
            piece = marker
            for letter in word:
                piece = add(piece, letter)
    return merges


def tiny_lm_tokenizer(words=WORDS):
    """A byte-level BPE GPT-2 tokenizer: <|endoftext|> (id 0), the 256 byte symbols, merges into `words`."""
    vocab = {"<|endoftext|>": 0}
    vocab.update({c: i + 1 for i, c in enumerate(_byte_alphabet())})
    merges = _merge_words(vocab, words, "Ġ")
    return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")


def tiny_clip_tokenizer(words=(), context_length=77):
    """A CLIP tokenizer over single characters, plus merges into `words`: <|startoftext|> = 0, <|endoftext|> = 1."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = _byte_alphabet()
    vocab.update({c: len(vocab) + i for i, c in enumerate(alphabet)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(alphabet)})
    merges = _merge_words(vocab, words, "</w>", end=True)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def tiny_image_processor(backend=None, side=32):
    """CLIP's image processor at `side` px; `backend` "pil" or "torchvision" (default: torchvision if installed)."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    backend = backend or ("torchvision" if is_torchvision_available() else "pil")
    cls = CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil
    return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def tiny_clip(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        # 32 px / 8 px patches: 16 patches + CLS = 17 vision tokens (>= 10 subregions).
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(config)


def tiny_lm(vocab_size, seed=0):
    torch.manual_seed(seed)
    # A wide init makes the random LM's output depend on its prefix, so noisy candidates differ.
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, initializer_range=0.5)
    return GPT2LMHeadModel(config)


def build_tiny_components(root, seed=0, image_backend=None):
    """Write `root/clip` (CLIPModel, image processor, tokenizer) and `root/lm` (GPT-2, tokenizer) as
    `from_pretrained` folders. Returns the two paths."""
    root = Path(root)
    clip_dir, lm_dir = root / "clip", root / "lm"
    clip_tokenizer, lm_tokenizer = tiny_clip_tokenizer(), tiny_lm_tokenizer()
    tiny_clip(len(clip_tokenizer), seed).save_pretrained(clip_dir)
    clip_tokenizer.save_pretrained(clip_dir)
    tiny_image_processor(image_backend).save_pretrained(clip_dir)
    tiny_lm(len(lm_tokenizer), seed).save_pretrained(lm_dir)
    lm_tokenizer.save_pretrained(lm_dir)
    return str(clip_dir), str(lm_dir)


# MacCap settings that fit the tiny CLIP (joint dim 16) and keep tests fast.
TINY_MACCAP = dict(num_queries=4, aligner_heads=4, aligner_ffn_dim=32)

"""Shared pieces of the benchmarks: real-size random components built offline, and the report plumbing.

Import this after setting HF_HUB_OFFLINE and a temporary HF_HOME (the scripts do so before importing transformers).
"""

import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from modeling_maccap.tools.open_clip_conversion import clip_tokenizer

EOT = "<|endoftext|>"
LM_TOKENIZER_NOTE = "byte-level BPE trained on the synthetic captions (stand-in for GPT-2's; no hub access)"
SUBJECTS = ["man", "woman", "young boy", "little girl", "dog", "cat", "group of people", "person", "couple", "player"]
VERBS = ["riding", "holding", "sitting on", "standing next to", "looking at", "walking with", "carrying",
         "playing with"]
ADJECTIVES = ["red", "small", "large", "white", "black", "wooden", "old", "blue", "green", "busy", "yellow", "tall"]
OBJECTS = ["bicycle", "skateboard", "surfboard", "umbrella", "frisbee", "horse", "bench", "kite", "laptop", "pizza"]
PLACES = ["down a street", "in a park", "on a beach", "in a kitchen", "across a field", "at a table", "near a road",
          "along the sidewalk", "inside a room", "in the city"]
ENDINGS = ["", "", "", "at night", "in the snow", "at sunset", "by a car"]


def synthetic_captions(n, seed=0):
    """Deterministic COCO-like captions of about 8-14 words."""
    rng = random.Random(seed)
    adjective = lambda p: [rng.choice(ADJECTIVES)] if rng.random() < p else []  # noqa: E731
    captions = []
    for _ in range(n):
        words = ["a", *adjective(0.3), rng.choice(SUBJECTS), rng.choice(VERBS), "a", *adjective(0.8),
                 rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(ENDINGS)]
        text = " ".join(w for w in words if w)
        captions.append(text[0].upper() + text[1:] + ".")
    return captions


def lm_tokenizer(captions):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=4096, special_tokens=[EOT], show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)


def build_components(root, captions):
    """Random CLIP ViT-B/32 (with OpenAI CLIP's BPE tokenizer) and GPT-2 124M as `from_pretrained` folders."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil
    from transformers.utils.import_utils import is_torchvision_available

    torch.manual_seed(0)
    clip_dir, lm_dir = root / "clip-vit-b32", root / "gpt2"
    act = "quick_gelu"
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         vocab_size=49408, max_position_embeddings=77, hidden_act=act,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act=act),
        projection_dim=512))
    clip.save_pretrained(clip_dir)
    clip_tokenizer().save_pretrained(clip_dir)
    image_processor = CLIPImageProcessor if is_torchvision_available() else CLIPImageProcessorPil
    image_processor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(clip_dir)
    tokenizer = lm_tokenizer(captions)
    # GPT-2's real vocabulary size (50257) keeps the LM head at full cost; the stand-in tokenizer uses the first ids.
    eot = tokenizer.eos_token_id
    GPT2LMHeadModel(GPT2Config(bos_token_id=eot, eos_token_id=eot)).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return str(clip_dir), str(lm_dir)


def machine():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or platform.machine()


def write_markdown(path, name, section):
    """Replace the section between `<!-- name:begin -->` and `<!-- name:end -->` of `path` (append it if missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{section}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def run_facts(name):
    """What every results file records about its run: the benchmark, the command, when, and on what."""
    return {"benchmark": name, "command": shlex.join(["python", *sys.argv]), "argv": sys.argv,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "machine": machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def publish(result, section, out, markdown):
    """Print the report, write the results JSON to `out` and, unless `markdown` is empty, the benchmark's own
    section of that markdown file."""
    print("\n" + section + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if markdown:
        write_markdown(Path(markdown), result["benchmark"], section)
        print(f"wrote {markdown}")

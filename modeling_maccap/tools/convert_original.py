"""Convert a checkpoint of the reference MacCap code (github Artanic30/MacCap, `checkpoint_last.pth`) into a
MacCap folder (not remote code).

The reference saves `{"model": state_dict, "optimizer", "lr_scheduler", "epoch", "args"}` where the state dict holds
`clip_model.*` (OpenAI CLIP layout), `model.*` (the Hugging Face LM), `query_fusion` (the queries), `aligner` (a
DETR decoder) and `align_proj` (the MLP). Frozen parts may have been left out; they then come from `--clip` /
`--lm`. The file is read with `torch.load(weights_only=True)`: tensors, containers and argparse.Namespace only.

A converted model decodes as the reference does: beam 4, `decoding_len` new tokens, candidates scored on their first
80 characters, the reference's caption cleaning and image preprocessing, all in float32. The reference decodes after
`question_embed`, the LM's embeddings of `tokenizer(eval_desc)` taken when training began; MacCap decodes after the
LM's own embedding of BOS, which is the same only for `eval_desc=''` and a frozen LM, so other checkpoints are refused.
"""

import argparse
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .errors import MacCapError, listing

logger = logging.getLogger(__name__)

PROJECTOR_PREFIXES = ("query_fusion.", "aligner.", "align_proj.")
# Also in the reference state dict, not needed: the LM's input embeddings a second time (`llm_vocab`), the prompt
# embeddings (`question_embed`, checked against the LM's in `check_prompt`), DeCap's memory bank.
IGNORED = ("llm_vocab.weight", "question_embed", "memory_bank")
# Attention-mask buffers that transformers 4.x GPT-2 kept in its state dict.
OLD_LM_BUFFERS = re.compile(r".*\.attn\.(bias|masked_bias)$")
REFERENCE_HEADS = 8  # TransformerDecoderLayer(prefix_size, 8) in the reference code
REFERENCE_DROPOUT = 0.1
REFERENCE_DECODING_LEN = 16  # --decoding_len
REFERENCE_RERANK_CHARACTERS = 80  # clip.tokenize(t[:80]) in its evaluation loop


def load_reference_checkpoint(path):
    """(state dict, args dict) of a reference checkpoint, read with weights_only=True."""
    if not Path(path).is_file():
        raise MacCapError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        raise MacCapError(f"cannot read {path} as a PyTorch checkpoint: not a file written by torch.save")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, AttributeError) as error:
        lines = str(error).splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise MacCapError(f"{path} holds objects that weights-only loading refuses (maccap never unpickles "
                              f"arbitrary objects): {reason}") from None
    except (OSError, RuntimeError, EOFError) as error:
        raise MacCapError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise MacCapError(f"{path} is not a reference MacCap checkpoint: no state dict of tensors under 'model'")
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return state, (vars(args) if isinstance(args, argparse.Namespace) else {})


def split_state(state):
    """{"projector", "clip", "lm"} sub-state dicts without their prefixes; unknown keys are an error."""
    parts = {"projector": {}, "clip": {}, "lm": {}}
    unknown = []
    for key, value in state.items():
        if key.startswith(PROJECTOR_PREFIXES):
            parts["projector"][key] = value
        elif key.startswith("clip_model."):
            parts["clip"][key[len("clip_model."):]] = value
        elif key.startswith("model."):
            parts["lm"][key[len("model."):]] = value
        elif key not in IGNORED:
            unknown.append(key)
    if unknown:
        raise MacCapError(f"unknown keys in the checkpoint: {listing(sorted(unknown))}")
    if not parts["projector"]:
        raise MacCapError("the checkpoint has no query_fusion / aligner / align_proj weights: not a MacCap checkpoint")
    return parts


# Reference projector key -> MacCapProjector key, as (pattern, replacement) pairs applied in order; and back.
RENAMES = [(r"^query_fusion\.", "queries."), (r"^aligner\.layers\.(\d+)\.multihead_attn\.", r"layers.\1.cross_attn."),
           (r"^aligner\.", ""), (r"^align_proj\.layers\.", "mlp.")]
INVERSE = [(r"^queries\.", "query_fusion."), (r"^layers\.(\d+)\.cross_attn\.", r"aligner.layers.\1.multihead_attn."),
           (r"^(layers|norm)\.", r"aligner.\1."), (r"^mlp\.", "align_proj.layers.")]


def _rename(key, rules):
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def reference_key(key):
    """A MacCapProjector key under its reference name."""
    return _rename(key, INVERSE)


def projector_state_dict(reference):
    """Reference projector weights under `MacCapProjector` keys."""
    return {_rename(key, RENAMES): value for key, value in reference.items()}


def reference_settings(projector, args):
    """MacCapConfig fields from the projector's shapes and the reference's training arguments."""
    for key in ("query_fusion.weight", "aligner.layers.0.linear1.weight", "align_proj.layers.0.weight"):
        if key not in projector:
            raise MacCapError(f"the projector weights do not fit: missing {key}")
    layers = {int(k.split(".")[2]) for k in projector if k.startswith("aligner.layers.")}
    if args.get("noise_type", "gaussian") != "gaussian":
        raise MacCapError(f"noise_type {args['noise_type']!r} was used in training; MacCap injects Gaussian noise")
    return dict(
        num_queries=projector["query_fusion.weight"].shape[0],
        aligner_layers=len(layers),
        aligner_heads=REFERENCE_HEADS,
        aligner_ffn_dim=projector["aligner.layers.0.linear1.weight"].shape[0],
        aligner_dropout=REFERENCE_DROPOUT,
        num_subregions=args.get("train_seq_length", 10),
        train_noise_variance=args.get("noise_variance", 0.016),
        inference_noise_variance=args.get("noise_k", 0.016),
        patch_weight=args.get("infer_patch_weight", 1.0),
        rerank_max_characters=REFERENCE_RERANK_CHARACTERS,
    )


def check_prompt(state, args, lm_model, tokenizer):
    """Refuse a checkpoint whose captions follow another prompt than the LM's own embedding of BOS (what MacCap
    decodes after): a text prompt (`eval_desc`), or a fine-tuned LM, whose `question_embed` is the LM's embedding of
    BOS from before fine-tuning."""
    desc = args.get("eval_desc") or ""
    if desc:
        raise MacCapError(f"the checkpoint captions after the text prompt eval_desc={desc!r}; maccap converts "
                              "checkpoints that caption after the prefix and BOS alone (eval_desc '')")
    if args.get("ft_llm"):
        raise MacCapError("the checkpoint fine-tuned its LM (ft_llm): the reference then decodes after the LM's "
                              "embedding of BOS from before fine-tuning (question_embed), which a converted model "
                              "cannot reproduce; not converted")
    if "question_embed" in state:
        ids = torch.tensor(tokenizer(desc)["input_ids"], dtype=torch.long)
        with torch.no_grad():
            expected = lm_model.get_input_embeddings()(ids).float()
        got = state["question_embed"].float()
        # The reference's LM ran in fp16, so its embeddings are fp16-rounded.
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
            raise MacCapError(f"the checkpoint's prompt embeddings (question_embed, {tuple(got.shape)}) are not the "
                                  f"LM's embeddings of {ids.tolist()} (tokenizer('')): it was prompted otherwise, or "
                                  "trained with another LM; not converted")


class _KeyRecorder(dict):
    """A state dict that remembers which keys were read, to find the ones a conversion left unused."""

    def __init__(self, data):
        super().__init__(data)
        self.used = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def _checkpoint_clip(weights):
    """(CLIPModel, image processor, CLIP tokenizer) of the checkpoint's own OpenAI CLIP: QuickGELU, width / 64
    heads, OpenAI's preprocessing and BPE vocabulary."""
    from . import open_clip_conversion as oc

    recorder = _KeyRecorder(weights)
    try:
        model = oc.clip_model_from_state_dict(recorder)
    except KeyError as error:
        raise MacCapError(f"the checkpoint's CLIP weights are incomplete: missing clip_model.{error.args[0]}") from None
    unused = set(weights) - recorder.used
    if unused:
        raise MacCapError(f"unknown CLIP keys in the checkpoint: {listing(sorted('clip_model.' + k for k in unused))}")
    image_processor = oc.image_processor_from_preprocess_cfg(dict(size=model.config.vision_config.image_size,
                                                                  mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD))
    return model, image_processor, oc.clip_tokenizer()


def _load_lm(lm, weights):
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)  # as a saved MacCap reloads
    if weights:
        weights = {k: v for k, v in weights.items() if not OLD_LM_BUFFERS.match(k)}
        result = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise MacCapError(f"the checkpoint's LM weights (model.*) do not fit {lm}: missing "
                              f"{listing(sorted(missing)) or 'none'}; unexpected "
                              f"{listing(sorted(result.unexpected_keys)) or 'none'}")
    return model


def convert(checkpoint, lm, out=None, clip=None):
    """Convert a reference checkpoint. `lm`: the LM it was trained with (Hub id or folder: architecture and
    tokenizer; its weights where the checkpoint has none); `clip`: only for checkpoints without CLIP weights.
    Saves to `out` when given. Returns the `MacCapForConditionalGeneration` (with `.processor`)."""
    from ..modeling_maccap import MacCapForConditionalGeneration, load_clip_model
    from ..processing_maccap import MacCapProcessor

    state, args = load_reference_checkpoint(checkpoint)
    parts = split_state(state)
    if parts["clip"] and clip:
        raise MacCapError("the checkpoint holds its own CLIP weights (clip_model.*); leave out --clip")
    if parts["clip"]:
        clip_model, image_processor, clip_tokenizer = _checkpoint_clip(parts["clip"])
        processor = MacCapProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(lm),
                                    clip_tokenizer=clip_tokenizer)
    elif clip:
        clip_model = load_clip_model(clip, dtype=torch.float32)
        processor = MacCapProcessor.from_pretrained_components(clip=clip, lm=lm)
    else:
        raise MacCapError("the checkpoint holds no CLIP weights (clip_model.*): pass --clip, e.g. "
                              "openai/clip-vit-base-patch32 or open_clip:ViT-B-32/openai")
    lm_model = _load_lm(lm, parts["lm"])
    settings = reference_settings(parts["projector"], args)
    check_prompt(state, args, lm_model, processor.tokenizer)

    width = parts["projector"]["query_fusion.weight"].shape[1]
    if width != clip_model.config.projection_dim:
        raise MacCapError(f"the projector is {width} wide but the CLIP joint space is "
                              f"{clip_model.config.projection_dim}: the checkpoint was trained with another CLIP")
    mlp = sorted((k for k in parts["projector"] if re.fullmatch(r"align_proj\.layers\.\d+\.weight", k)),
                 key=lambda k: int(k.split(".")[2]))
    out_features, hidden = parts["projector"][mlp[-1]].shape[0], lm_model.get_input_embeddings().embedding_dim
    if out_features != hidden:
        raise MacCapError(f"the projector outputs {out_features} features but {lm} has {hidden}: pass the LM it "
                              "was trained with")

    model = MacCapForConditionalGeneration.from_components(clip_model, lm_model, **settings)
    result = model.projector.load_state_dict(projector_state_dict(parts["projector"]), strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = (listing(sorted(map(reference_key, keys))) or "none"
                               for keys in (result.missing_keys, result.unexpected_keys))
        raise MacCapError(f"the projector weights do not fit: missing {missing}; unexpected {unexpected}")
    model.requires_grad_(False).eval()
    model.generation_config.max_new_tokens = args.get("decoding_len", REFERENCE_DECODING_LEN)
    if not processor.tokenizer("")["input_ids"]:
        logger.warning(f"{lm}'s tokenizer adds no BOS token: the reference code trained and prompted this LM with "
                       "nothing after the prefix, while MacCap puts BOS there; captions can differ from the reference's")
    model.processor = processor
    if out is not None:
        model.save_pretrained(out)
        model.processor.save_pretrained(out)
    return model


def add_parser(commands):
    conv = commands.add_parser("convert-original", help="convert a checkpoint of the reference MacCap code")
    conv.add_argument("checkpoint", help="checkpoint_last.pth written by the reference code (read weights-only)")
    conv.add_argument("--lm", required=True, help="the LM it was trained with (Hub id or folder)")
    conv.add_argument("--out", required=True, help="folder for the converted MacCap")
    conv.add_argument("--clip", help="CLIP for checkpoints saved without clip_model.* weights (Hub id, folder or "
                                     "open_clip:ARCH/TAG)")
    conv.set_defaults(run=run)


def run(args):
    convert(args.checkpoint, lm=args.lm, out=args.out, clip=args.clip)
    print(f"converted {args.checkpoint} -> {args.out}")
    return 0

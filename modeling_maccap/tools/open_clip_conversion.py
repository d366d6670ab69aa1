"""open_clip and OpenAI-format CLIP weights as a transformers `CLIPModel` (needs `pip install maccap[open_clip]`;
never shipped as remote code).

`clip="open_clip:ViT-B-32/openai"` in `from_pretrained_components` builds the open_clip model, converts its
weights into the HF CLIP tower, and takes the image preprocessing and tokenizer from open_clip. The same key
mapping converts the `clip_model.*` weights of reference MacCap checkpoints (OpenAI CLIP layout).
"""

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
from transformers.image_utils import PILImageResampling

PREFIX = "open_clip:"
# The ViT towers whose computation HF CLIP reproduces exactly (with their -quickgelu and higher-resolution twins).
SUPPORTED = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14")
RESAMPLING = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR,
              "nearest": PILImageResampling.NEAREST}


def parse_spec(spec):
    """"open_clip:ARCH/TAG" -> (ARCH, TAG); "open_clip:ARCH" -> (ARCH, None), open_clip's random initialisation."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    arch, _, tag = body.partition("/")
    if not arch.startswith(SUPPORTED):
        raise ValueError(f"open_clip architecture {arch!r} does not map onto HF CLIP; supported: "
                         f"{', '.join(SUPPORTED)} (and their -quickgelu / -336 variants)")
    return arch, tag or None


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ImportError("open_clip CLIP specs need open_clip_torch: pip install 'maccap[open_clip]'") from None
    return open_clip


# ------------------------------------------------------------------------------------------- config + weights
def clip_config_from_state_dict(state_dict, vision_heads=None, text_heads=None, quick_gelu=True):
    """The HF `CLIPConfig` of an OpenAI-layout CLIP state dict, read from its shapes. Head counts default to
    width / 64 (OpenAI's models); `quick_gelu` is the OpenAI activation (open_clip's LAION models use GELU)."""
    sd = state_dict
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]

    def layers(prefix):  # number of distinct block indices under prefix ("...resblocks.")
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    act = "quick_gelu" if quick_gelu else "gelu"
    return CLIPConfig(
        vision_config=dict(hidden_size=width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                           num_hidden_layers=layers("visual.transformer.resblocks."), num_attention_heads=vision_heads or width // 64,
                           image_size=grid * patch, patch_size=patch, hidden_act=act),
        text_config=dict(hidden_size=text_width, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         num_hidden_layers=layers("transformer.resblocks."), num_attention_heads=text_heads or text_width // 64,
                         vocab_size=sd["token_embedding.weight"].shape[0],
                         max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=act,
                         # eos_token_id 2 selects the pooled token by argmax of the ids, as OpenAI CLIP does
                         bos_token_id=49406, eos_token_id=2, pad_token_id=1),
        projection_dim=sd["text_projection"].shape[1],
    )


def _blocks(sd, source, target, n):
    out = {}
    for i in range(n):
        s, t = f"{source}.{i}.", f"{target}.{i}."
        q, k, v = sd[s + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[s + "attn.in_proj_bias"].chunk(3)
        out.update({
            t + "self_attn.q_proj.weight": q, t + "self_attn.k_proj.weight": k, t + "self_attn.v_proj.weight": v,
            t + "self_attn.q_proj.bias": qb, t + "self_attn.k_proj.bias": kb, t + "self_attn.v_proj.bias": vb,
            t + "self_attn.out_proj.weight": sd[s + "attn.out_proj.weight"],
            t + "self_attn.out_proj.bias": sd[s + "attn.out_proj.bias"],
        })
        for src, dst in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2")):
            out[t + dst + ".weight"] = sd[s + src + ".weight"]
            out[t + dst + ".bias"] = sd[s + src + ".bias"]
    return out


def hf_state_dict_from_openai(state_dict, config):
    """OpenAI-layout CLIP weights -> `CLIPModel` state dict keys (fused in_proj split into q/k/v, projections
    transposed). Raises KeyError naming the first missing weight."""
    sd = state_dict
    vision, text = "vision_model.", "text_model."
    out = {
        vision + "embeddings.class_embedding": sd["visual.class_embedding"],
        vision + "embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        vision + "embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        vision + "pre_layrnorm.weight": sd["visual.ln_pre.weight"], vision + "pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        vision + "post_layernorm.weight": sd["visual.ln_post.weight"],
        vision + "post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t(),
        text + "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        text + "embeddings.position_embedding.weight": sd["positional_embedding"],
        text + "final_layer_norm.weight": sd["ln_final.weight"], text + "final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t(),
        "logit_scale": sd["logit_scale"],
    }
    out.update(_blocks(sd, "visual.transformer.resblocks", vision + "encoder.layers",
                       config.vision_config.num_hidden_layers))
    out.update(_blocks(sd, "transformer.resblocks", text + "encoder.layers", config.text_config.num_hidden_layers))
    return {k: v.contiguous() for k, v in out.items()}


def clip_model_from_state_dict(state_dict, dtype=None, **config_kwargs):
    """A `CLIPModel` holding the weights of an OpenAI-layout CLIP state dict."""
    config = clip_config_from_state_dict(state_dict, **config_kwargs)
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(hf_state_dict_from_openai(state_dict, config), strict=True, assign=True)
    model.text_model.embeddings.position_ids = torch.arange(config.text_config.max_position_embeddings).unsqueeze(0)
    model.vision_model.embeddings.position_ids = torch.arange(
        model.vision_model.embeddings.num_positions).unsqueeze(0)
    # Mark everything as loaded, as from_pretrained does: a MacCap built around this tower must not re-initialise it.
    for tensor in model.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True
    for module in model.modules():
        module._is_hf_initialized = True
    return model.to(dtype) if dtype is not None else model.float()


def _check_mappable(model):
    visual = model.visual
    reasons = []
    if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
        reasons.append("its image tower is not a plain ViT with CLS pooling")
    elif getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
        reasons.append("its image tower pools other than by the CLS token")
    if not hasattr(model, "token_embedding") or getattr(model, "text_pool_type", "argmax") != "argmax":
        reasons.append("its text tower is not CLIP's (argmax pooling)")
    if reasons:
        raise ValueError(f"this open_clip model does not map onto HF CLIP: {'; '.join(reasons)}")


def clip_model_from_open_clip(model, dtype=None):
    """Convert an open_clip `CLIP` (ViT towers) into a transformers `CLIPModel` with the same computation."""
    _check_mappable(model)
    gelu = model.visual.transformer.resblocks[0].mlp.gelu
    return clip_model_from_state_dict(
        model.state_dict(), dtype=dtype, vision_heads=model.visual.transformer.resblocks[0].attn.num_heads,
        text_heads=model.transformer.resblocks[0].attn.num_heads, quick_gelu=type(gelu).__name__ == "QuickGELU")


# ------------------------------------------------------------------------------------- preprocessing + tokens
def image_processor_from_preprocess_cfg(cfg):
    """open_clip's preprocessing as a CLIP image processor (PIL backend, as open_clip's transforms use PIL)."""
    height, width = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    if cfg.get("interpolation", "bicubic") not in RESAMPLING:
        raise ValueError(f"open_clip interpolation {cfg['interpolation']!r} has no PIL equivalent here")
    common = dict(resample=RESAMPLING[cfg.get("interpolation", "bicubic")], image_mean=list(cfg["mean"]),
                  image_std=list(cfg["std"]), do_convert_rgb=True)
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest" and height == width:
        return CLIPImageProcessorPil(size={"shortest_edge": height}, crop_size={"height": height, "width": width},
                                     do_center_crop=True, **common)
    if mode == "squash":
        return CLIPImageProcessorPil(size={"height": height, "width": width}, do_center_crop=False, **common)
    raise ValueError(f"open_clip resize_mode {mode!r} at size {cfg['size']} has no CLIP image processor equivalent")


def clip_tokenizer():
    """OpenAI CLIP's BPE tokenizer as a transformers `CLIPTokenizer`, built from the vocabulary open_clip ships."""
    simple = _open_clip().SimpleTokenizer()
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=dict(simple.encoder), merges=merges, model_max_length=simple.context_length,
                         bos_token="<start_of_text>", eos_token="<end_of_text>", pad_token="<end_of_text>",
                         unk_token="<end_of_text>")


# ------------------------------------------------------------------------------------------ from a spec string
def load_clip(spec, dtype=None):
    """`open_clip:ARCH[/TAG]` -> converted `CLIPModel` (TAG downloads open_clip's weights; none: random init)."""
    arch, tag = parse_spec(spec)
    model = _open_clip().create_model(arch, pretrained=tag)
    return clip_model_from_open_clip(model.eval(), dtype=dtype)


def load_processors(spec):
    """`open_clip:ARCH[/TAG]` -> (image processor, CLIP tokenizer), without loading any weights."""
    open_clip = _open_clip()
    arch, tag = parse_spec(spec)
    cfg = dict(open_clip.get_model_preprocess_cfg(open_clip.create_model(arch, pretrained=None, device="meta")))
    if tag:  # the weights' own normalisation and resizing, as open_clip merges them at creation
        cfg.update({k: v for k, v in open_clip.get_pretrained_cfg(arch, tag).items()
                    if k in ("mean", "std", "interpolation", "resize_mode")})
    return image_processor_from_preprocess_cfg(cfg), clip_tokenizer()

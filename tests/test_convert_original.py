"""`maccap convert-original`: a checkpoint in the reference code's layout becomes a MacCap with the same prefix
embeddings (same noise) and the same captions. The reference computation is written out here from the reference
code's structure (OpenAI CLIP with the last block's attention, DETR decoder, MLP), on a tiny model."""

import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")

from modeling_maccap.tools.cli import main  # noqa: E402
from modeling_maccap.tools.convert_original import convert  # noqa: E402
from modeling_maccap.modeling_maccap import noise_injection  # noqa: E402
from modeling_maccap.tools.open_clip_conversion import (  # noqa: E402
    clip_model_from_open_clip, clip_tokenizer, image_processor_from_preprocess_cfg)
from modeling_maccap.tools.tiny import tiny_lm_tokenizer  # noqa: E402

from .conftest import random_image  # noqa: E402

K, VARIANCE, PATCH_WEIGHT = 6, 0.02, 0.7


def reference_clean(text):
    """The reference's caption cleaning (its clean_func), step by step."""
    if "Answer:" in text:
        text = text.split("Answer:")[-1].strip()
    if "<PAD>" in text:
        text = text.replace("<PAD>", "").strip()
    for pattern, replacement in ((r"[^a-zA-Z\d ,.]", ""), (r"[ ]+", " "), (r"[.]+", "."), (r"[0-9]{4}", "")):
        text = re.sub(pattern, replacement, text)
    return text.strip()


class ReferenceLayer(nn.Module):
    """The reference's DETR decoder layer (post-norm, ReLU), sequence-first attention."""

    def __init__(self, d, heads, ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=0.1)
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt, memory):
        tgt = self.norm1(tgt + self.self_attn(tgt, tgt, tgt)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt, memory, memory)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class ReferenceMacCap(nn.Module):
    """The module tree of the reference MacCap, so its state_dict has the reference checkpoint's keys."""

    def __init__(self, clip_model, lm, question_ids, num_query=5, layers=2, ffn=48):
        super().__init__()
        d = clip_model.text_projection.shape[1]
        self.clip_model, self.model = clip_model, lm
        self.llm_vocab = lm.get_input_embeddings()
        self.query_fusion = nn.Embedding(num_query, d)
        self.aligner = nn.Module()
        self.aligner.layers = nn.ModuleList(ReferenceLayer(d, 8, ffn) for _ in range(layers))
        self.aligner.norm = nn.LayerNorm(d)
        self.align_proj = nn.Module()
        self.align_proj.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, lm.config.hidden_size)])
        # The prompt after the prefix: the LM's embeddings of tokenizer(eval_desc), taken when training begins.
        self.register_buffer("question_embed", self.llm_vocab(question_ids).detach())

    def visual(self, x):
        """OpenAI CLIP's ViT returning the projected CLS, all ln_post tokens, proj, and the last block's
        head-averaged attention (as the reference's ClipContextual does)."""
        v = self.clip_model.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
        last = v.transformer.resblocks[-1]
        h = last.ln_1(x)
        out, attention = last.attn(h, h, h, need_weights=True)  # averaged over heads
        x = x + out
        x = x + last.mlp(last.ln_2(x))
        context = v.ln_post(x)
        return context[:, 0] @ v.proj, context, v.proj, attention

    def prefix(self, pixel_values, noise):
        cls, context, proj, attention = self.visual(pixel_values)
        cls = cls / cls.norm(dim=-1, keepdim=True)
        tokens = context @ proj
        tokens = tokens / tokens.norm(dim=-1, keepdim=True)
        mixed = []
        for b, ids in enumerate(attention[:, 0, :].topk(K).indices):
            mixed.append(attention[b, ids].softmax(dim=-1) @ tokens[b])
        features = cls.unsqueeze(1) + F.normalize(torch.stack(mixed), dim=-1) * PATCH_WEIGHT
        features = F.normalize(features + noise, dim=-1)
        hs = self.query_fusion.weight.unsqueeze(1).repeat(1, features.shape[0], 1)  # (queries, batch, d)
        memory = features.permute(1, 0, 2)
        for layer in self.aligner.layers:
            hs = layer(hs, memory)
        x = self.aligner.norm(hs).permute(1, 0, 2)
        for i, linear in enumerate(self.align_proj.layers):
            x = linear(x) if i == 2 else F.relu(linear(x))
        return x


def tiny_openai_clip(seed=0):
    """An OpenAI-layout CLIP (QuickGELU, width / 64 heads) with the real BPE vocabulary, tiny otherwise."""
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        64, dict(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
        dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2), quick_gelu=True).eval()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny OPT whose tokenizer puts BOS first, as OPT's does (the reference's default LM family)."""
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    base = tiny_lm_tokenizer()
    tokenizer = GPT2Tokenizer(vocab=base.get_vocab(), merges=[], bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>", add_bos_token=True)
    torch.manual_seed(1)
    lm = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                                  ffn_dim=64, num_attention_heads=4, max_position_embeddings=128, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0, init_std=0.5))
    folder = tmp_path_factory.mktemp("opt")
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(2)
    question_ids = torch.tensor(AutoTokenizer.from_pretrained(lm_dir)("")["input_ids"])  # eval_desc '': [BOS]
    model = ReferenceMacCap(tiny_openai_clip(), AutoModelForCausalLM.from_pretrained(lm_dir), question_ids).eval()
    for name, p in model.named_parameters():  # a trained-looking projector (and CLIP); the LM stays frozen
        if not name.startswith(("model.", "llm_vocab.")):
            p.data += 0.05 * torch.randn_like(p)
    return model


def save_checkpoint(path, state, args=None):
    args = args or argparse.Namespace(train_seq_length=K, noise_variance=0.01, noise_k=VARIANCE,
                                      infer_patch_weight=PATCH_WEIGHT, noise_type="gaussian", num_decoder_layer=2)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "args": args}, path)
    return path


def projector_only(reference):
    """The reference state dict without its frozen parts (CLIP, LM), as a checkpoint may be saved."""
    return {k: v for k, v in reference.state_dict().items() if k.startswith(("query_fusion", "aligner", "align_proj"))}


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("reference") / "checkpoint_last.pth", reference.state_dict())


@pytest.fixture(scope="module")
def converted(checkpoint, lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    assert main(["convert-original", str(checkpoint), "--lm", str(lm_dir), "--out", str(out)]) == 0
    from modeling_maccap import MacCapForConditionalGeneration

    return MacCapForConditionalGeneration.from_pretrained(out).eval()


def test_settings_come_from_the_checkpoint(converted):
    c = converted.config
    assert (c.num_queries, c.aligner_layers, c.aligner_heads, c.aligner_ffn_dim) == (5, 2, 8, 48)
    assert (c.num_subregions, c.train_noise_variance, c.inference_noise_variance, c.patch_weight) == (K, 0.01, VARIANCE,
                                                                                                        PATCH_WEIGHT)
    assert c.clip_config.vision_config.hidden_act == "quick_gelu"


def test_prefix_embeddings_equal_the_reference_for_the_same_noise(reference, converted):
    images = [random_image(40, (50, 40)), random_image(41, (33, 61)), random_image(42)]
    pixel_values = converted.processor(images=images)["pixel_values"]
    noise = torch.randn(3, K, 64, generator=torch.Generator().manual_seed(9)) * math.sqrt(VARIANCE)
    with torch.no_grad():
        expected = reference.prefix(pixel_values, noise)
        got = converted.projector(noise_injection(converted.get_subregion_features(pixel_values).subregion_features,
                                                  noise))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_captions_equal_the_reference_decoding(reference, converted, lm_dir):
    """The reference decodes with beam 4 and 16 new tokens from [prefix; embeddings of tokenizer('')], its noise
    drawn from the global RNG: seeded alike, the converted model (noise_seed=None, no reranking) decodes the same."""
    images = [random_image(50, (64, 64)), random_image(51, (40, 30))]
    inputs = converted.processor(images=images)
    torch.manual_seed(11)
    with torch.no_grad():
        ids = converted.generate(**inputs, rerank=False, noise_seed=None)
    got = converted.processor.batch_decode(ids)

    tokenizer = converted.processor.tokenizer
    torch.manual_seed(11)
    with torch.no_grad():
        noise = torch.randn(len(images), K, 64) * math.sqrt(VARIANCE)
        prefix = reference.prefix(inputs["pixel_values"], noise)
        embeds = torch.cat([prefix, reference.question_embed.expand(len(images), -1, -1)], dim=1)
        new = reference.model.generate(inputs_embeds=embeds, num_beams=4, max_new_tokens=16)
    expected = [reference_clean(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    assert any(expected), "the tiny reference should say something"
    assert got == expected


def test_candidates_are_scored_on_their_first_80_characters_as_the_reference_does(reference, converted):
    """The reference reranks on clip.tokenize(t[:80]) with its own CLIP; the converted model scores alike."""
    assert converted.config.rerank_max_characters == 80
    captions = ["a small red and blue cat sitting on a wooden table next to a tall green plant in a bright room",
                "a dog"]
    image = converted.processor(images=[random_image(70)])["pixel_values"]
    with torch.no_grad():
        image_embeds = converted.get_subregion_features(image).image_embeds.expand(2, -1)
        got = converted.score_captions(captions, image_embeds)
        tokens = open_clip.tokenize([c[:80] for c in captions])
        text = F.normalize(reference.clip_model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(got, (text * image_embeds).sum(-1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the first caption is longer than 80 characters: cutting it changes its score
        whole = F.normalize(reference.clip_model.encode_text(open_clip.tokenize(captions[:1])), dim=-1)
    assert not torch.allclose(got[0], (whole * image_embeds[:1]).sum(-1), atol=1e-4)


def test_the_saved_folder_reloads_the_exact_preprocessing(checkpoint, lm_dir, converted):
    """The reference's preprocessing is PIL's (CLIPImageProcessorPil); the saved folder reloads it, not the
    torchvision backend, so resized images give the same pixels."""
    in_memory = convert(checkpoint, lm=str(lm_dir)).processor
    images = [random_image(80, (97, 61)), random_image(81, (33, 120))]
    assert type(converted.processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert converted.processor.image_backend == "pil"
    assert torch.equal(converted.processor(images=images)["pixel_values"], in_memory(images=images)["pixel_values"])


def test_decoding_length_comes_from_the_checkpoint(reference, lm_dir, tmp_path):
    args = argparse.Namespace(train_seq_length=K, noise_variance=0.01, noise_k=VARIANCE, infer_patch_weight=PATCH_WEIGHT,
                              noise_type="gaussian", decoding_len=9)
    out = tmp_path / "out"
    convert(save_checkpoint(tmp_path / "c.pth", reference.state_dict(), args), lm=str(lm_dir), out=out)
    from modeling_maccap import MacCapForConditionalGeneration

    assert MacCapForConditionalGeneration.from_pretrained(out).generation_config.max_new_tokens == 9


@pytest.mark.parametrize("change, message", [
    ({"eval_desc": "A picture of"}, "captions after the text prompt eval_desc='A picture of'"),
    ({"ft_llm": True}, "fine-tuned its LM (ft_llm)"),
    ({"question_embed": torch.ones(1, 32)}, "prompt embeddings (question_embed, (1, 32)) are not the LM's"),
    ({"question_embed": torch.zeros(3, 32)}, "prompt embeddings (question_embed, (3, 32)) are not the LM's"),
])
def test_a_checkpoint_prompted_otherwise_is_refused(reference, lm_dir, tmp_path, capsys, change, message):
    """The reference decodes after question_embed; MacCap after the LM's embedding of BOS. Any other prompt (a text
    prompt, or BOS embedded by the LM before it was fine-tuned) would caption differently: refused, not converted."""
    args = vars(argparse.Namespace(train_seq_length=K, noise_variance=0.01, noise_k=VARIANCE,
                                   infer_patch_weight=PATCH_WEIGHT, noise_type="gaussian"))
    state = dict(reference.state_dict())
    for key, value in change.items():
        (state if key == "question_embed" else args)[key] = value
    path = save_checkpoint(tmp_path / "p.pth", state, argparse.Namespace(**args))
    assert message in _converted_error(path, lm_dir, capsys)


def test_an_fp16_lm_folder_converts_to_float32_as_the_saved_folder_reloads(reference, lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = tmp_path / "opt-fp16"
    AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float16).save_pretrained(half)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(half)
    path = save_checkpoint(tmp_path / "projector.pth", {k: v for k, v in reference.state_dict().items()
                                                        if not k.startswith(("model.", "llm_vocab."))})
    model = convert(path, lm=str(half), out=tmp_path / "out")
    from modeling_maccap import MacCapForConditionalGeneration

    reloaded = MacCapForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in reloaded.named_parameters()}


def test_frozen_parts_may_be_absent(reference, lm_dir, tmp_path):
    """A checkpoint with only the projector: CLIP comes from --clip, the LM's weights from --lm."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    clip_dir = tmp_path / "clip"
    clip_model_from_open_clip(reference.clip_model).save_pretrained(clip_dir)
    image_processor_from_preprocess_cfg(dict(size=32, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)).save_pretrained(clip_dir)
    clip_tokenizer().save_pretrained(clip_dir)
    path = save_checkpoint(tmp_path / "projector.pth", projector_only(reference))
    model = convert(path, lm=str(lm_dir), clip=str(clip_dir)).eval()
    pixel_values = model.processor(images=[random_image(60)])["pixel_values"]
    noise = torch.randn(1, K, 64) * 0.1
    with torch.no_grad():
        got = model.projector(noise_injection(model.get_subregion_features(pixel_values).subregion_features, noise))
        torch.testing.assert_close(got, reference.prefix(pixel_values, noise), atol=1e-5, rtol=1e-5)


def _converted_error(path, lm_dir, capsys, *extra):
    assert main(["convert-original", str(path), "--lm", str(lm_dir), "--out", str(path.parent / "out"), *extra]) == 2
    return capsys.readouterr().err


def test_unknown_and_missing_keys_are_listed(reference, lm_dir, tmp_path, capsys):
    state = dict(reference.state_dict())
    state["decoder.extra.weight"] = torch.zeros(1)
    err = _converted_error(save_checkpoint(tmp_path / "a.pth", state), lm_dir, capsys)
    assert "unknown keys in the checkpoint: decoder.extra.weight" in err

    state = dict(reference.state_dict())
    del state["aligner.norm.weight"], state["align_proj.layers.1.bias"]
    err = _converted_error(save_checkpoint(tmp_path / "b.pth", state), lm_dir, capsys)
    assert "missing align_proj.layers.1.bias, aligner.norm.weight" in err

    state = dict(reference.state_dict())
    del state["clip_model.visual.proj"]
    err = _converted_error(save_checkpoint(tmp_path / "c.pth", state), lm_dir, capsys)
    assert "CLIP weights are incomplete: missing clip_model.visual.proj" in err

    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("clip_model.")}
    err = _converted_error(save_checkpoint(tmp_path / "d.pth", state), lm_dir, capsys)
    assert "holds no CLIP weights (clip_model.*): pass --clip" in err

    state = dict(reference.state_dict())
    state["model.model.decoder.extra"] = torch.zeros(1)
    err = _converted_error(save_checkpoint(tmp_path / "e.pth", state), lm_dir, capsys)
    assert "unexpected model.decoder.extra" in err


def test_wrong_lm_and_wrong_clip_are_named(reference, checkpoint, components, lm_dir, tmp_path, capsys):
    err = _converted_error(checkpoint, components[1], capsys)  # the tiny GPT-2, not the OPT it was trained with
    assert "the checkpoint's LM weights (model.*) do not fit" in err and "missing transformer.h.0." in err
    path = save_checkpoint(tmp_path / "p.pth", projector_only(reference))
    err = _converted_error(path, lm_dir, capsys, "--clip", components[0])  # a CLIP with a 16-wide joint space
    assert "the projector is 64 wide but the CLIP joint space is 16" in err


class Arbitrary:
    pass


def test_arbitrary_pickled_objects_are_refused(reference, lm_dir, tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": reference.state_dict(), "args": Arbitrary()}, path)
    err = _converted_error(path, lm_dir, capsys)
    assert "weights-only loading refuses" in err and "never unpickles arbitrary objects" in err
    assert "Unsupported global" in err and "Arbitrary" in err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "cannot read" in _converted_error(tmp_path / "junk.pth", lm_dir, capsys)

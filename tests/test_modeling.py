"""MacCapForConditionalGeneration: each behaviour checked against an independent computation in the test."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, DynamicCache

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap import modeling_maccap as modeling
from modeling_maccap.modeling_maccap import image_seed, noise_injection, sample_noise
from modeling_maccap.transformers_compat import CACHE_ARGUMENTS, cache_argument

from .conftest import random_image


def reference_subregions(clip_dir, pixel_values, k, temperature, patch_weight):
    """method.md's subregion aggregation, from a separately loaded CLIP run with eager attention."""
    clip = CLIPModel.from_pretrained(clip_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = clip.vision_model(pixel_values=pixel_values, output_attentions=True)
        A = out.attentions[-1].mean(1)  # last layer, averaged over heads: (B, T, T)
        P = F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(out.last_hidden_state)), dim=-1)
        g = F.normalize(clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    features = []
    for b in range(pixel_values.shape[0]):
        top = torch.argsort(A[b, 0], descending=True)[:k]
        rows = []
        for i in top:
            w = torch.softmax(A[b, i] / temperature, dim=-1)
            m = F.normalize(w @ P[b], dim=-1)
            rows.append(g[b] + patch_weight * m)
        features.append(torch.stack(rows))
    return torch.stack(features), g


# ------------------------------------------------------------------------------------------ subregion features
@pytest.mark.parametrize("temperature,patch_weight,k", [(1.0, 1.0, 10), (0.05, 0.3, 5)])
def test_subregion_features_follow_the_formula(components, make_model, processor, images, temperature,
                                               patch_weight, k):
    model = make_model(subregion_temperature=temperature, patch_weight=patch_weight, num_subregions=k)
    pixel_values = processor(images=images)["pixel_values"]
    expected, g = reference_subregions(components[0], pixel_values, k, temperature, patch_weight)
    with torch.no_grad():
        out = model.get_subregion_features(pixel_values)
    assert out.subregion_features.shape == (len(images), k, 16)
    torch.testing.assert_close(out.image_embeds, g, atol=1e-5, rtol=1e-5)
    # The order of equal-attention tokens may differ, so compare the sets of rows.
    got = out.subregion_features.sort(dim=1).values
    torch.testing.assert_close(got, expected.sort(dim=1).values, atol=1e-5, rtol=1e-5)


def test_subregion_attention_is_taken_without_eager_attention(model, processor, images):
    """The vision tower keeps SDPA; only the last layer's probabilities are recomputed."""
    assert model.clip.config.vision_config._attn_implementation == "sdpa"
    with torch.no_grad():
        out = model.get_subregion_features(processor(images=images)["pixel_values"])
    torch.testing.assert_close(out.attentions.sum(-1), torch.ones(3, 17))


def test_cls_mode_repeats_the_global_embedding(make_model, processor, images):
    model = make_model(subregion_mode="cls", num_subregions=7)
    with torch.no_grad():
        out = model.get_subregion_features(processor(images=images)["pixel_values"])
    assert out.subregion_features.shape == (3, 7, 16)
    torch.testing.assert_close(out.subregion_features, out.image_embeds[:, None].expand(-1, 7, -1))
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))


def test_more_subregions_than_vision_tokens_is_an_error(make_model, processor, images):
    model = make_model(num_subregions=18)  # the tiny CLIP has 17 tokens
    with pytest.raises(ValueError, match="num_subregions=18 exceeds the 17 vision tokens"):
        model.get_subregion_features(processor(images=images)["pixel_values"])


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 3, 64, 64), (1, 1, 32, 32)])
def test_pixel_values_of_the_wrong_shape_are_rejected(model, shape):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 32, 32\)"):
        model.generate(pixel_values=torch.zeros(shape))


# ------------------------------------------------------------------------------------------------- projector
def test_projector_is_a_detr_decoder_then_a_three_layer_mlp(make_model):
    """The aligner layers equal PyTorch's own post-norm TransformerDecoderLayer (DETR's), then LayerNorm, then
    Linear-ReLU-Linear-ReLU-Linear; every size follows the config."""
    model = make_model(num_queries=5, aligner_layers=2, aligner_heads=2, aligner_ffn_dim=24, aligner_dropout=0.3)
    projector = model.projector.eval()
    assert projector.queries.weight.shape == (5, 16) and len(projector.layers) == 2
    references = []
    for layer in projector.layers:
        assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 24 and layer.dropout.p == 0.3
        ref = torch.nn.TransformerDecoderLayer(16, 2, dim_feedforward=24, dropout=0.3, batch_first=True).eval()
        state = {k.replace("cross_attn", "multihead_attn"): v for k, v in layer.state_dict().items()}
        ref.load_state_dict(state)
        references.append(ref)
    features = F.normalize(torch.randn(3, 10, 16), dim=-1)
    with torch.no_grad():
        x = projector.queries.weight.expand(3, -1, -1)
        for ref in references:
            x = ref(x, features)
        x = projector.norm(x)
        a, b, c = projector.mlp
        expected = c(torch.relu(b(torch.relu(a(x)))))
        torch.testing.assert_close(projector(features), expected, atol=1e-5, rtol=1e-5)
    assert expected.shape == (3, 5, model.config.text_config.hidden_size)


def test_aligner_dropout_is_active_in_training_only(make_model):
    model = make_model(aligner_dropout=0.5)
    features = F.normalize(torch.randn(2, 10, 16), dim=-1)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.projector(features), model.projector(features))
        model.train()
        assert not torch.equal(model.projector(features), model.projector(features))


# -------------------------------------------------------------------------------------------- noise injection
def test_noise_has_zero_mean_and_the_configured_variance():
    noise = sample_noise((2000, 10, 512), 0.016)
    assert abs(noise.mean().item()) < 1e-3
    assert noise.var().item() == pytest.approx(0.016, rel=0.01)
    per_image = sample_noise((4, 10, 512), 0.25, [torch.Generator().manual_seed(i) for i in range(4)])
    assert per_image.var().item() == pytest.approx(0.25, rel=0.05)


def test_noise_injection_adds_then_normalises():
    x = F.normalize(torch.randn(5, 10, 16), dim=-1)
    n = torch.randn(5, 10, 16) * 0.1
    y = noise_injection(x, n)
    expected = (x + n) / (x + n).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, expected)


def test_training_injects_noise_of_the_train_variance(make_model, processor):
    """Training prefix = projector(normalise(t + N(0, train_noise_variance))) with k copies of t."""
    model = make_model(train_noise_variance=0.3, inference_noise_variance=0.0)
    batch = processor(text=["a dog on the grass", "a red cat"])
    with torch.no_grad():
        t = F.normalize(model.clip.get_text_features(input_ids=batch["clip_input_ids"],
                                                     attention_mask=batch["clip_attention_mask"]).pooler_output, dim=-1)
        torch.manual_seed(7)
        out = model(**batch)
        torch.manual_seed(7)
        noise = torch.randn(2, model.config.num_subregions, 16) * 0.3**0.5
        expected = model.projector(F.normalize(t[:, None] + noise, dim=-1))
        torch.testing.assert_close(out.prefix_embeds, expected)
        clean = model.projector(t[:, None].expand(-1, model.config.num_subregions, -1))
    assert not torch.allclose(out.prefix_embeds, clean, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- the loss
def test_loss_is_cross_entropy_over_caption_tokens_only(model, processor):
    batch = processor(text=["a dog on the grass with a man", "a cat"])
    torch.manual_seed(0)
    out = model(**batch)
    # Independent forward: the LM on [prefix ; token embeddings], then CE on caption tokens and EOS.
    embeds = torch.cat([out.prefix_embeds, model.language_model.get_input_embeddings()(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, out.prefix_embeds.shape[1], dtype=torch.long), batch["attention_mask"]], 1)
    with torch.no_grad():
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, out.prefix_embeds.shape[1]:]
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    total, count = 0.0, 0
    for b in range(2):
        length = int(batch["attention_mask"][b].sum())
        for t in range(1, length):  # token t is predicted at position t - 1; BOS (t = 0) is not scored
            total -= torch.log_softmax(logits[b, t - 1], -1)[batch["input_ids"][b, t]].item()
            count += 1
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_padding_does_not_change_the_loss(model, processor):
    short = processor(text=["a cat"])
    padded = processor(text=["a cat", "a dog on the grass with a man on the table"])
    torch.manual_seed(0)
    alone = model(**short).loss
    torch.manual_seed(0)
    logits = model(**padded).logits
    n = short["input_ids"].shape[1]
    targets = short["input_ids"][0, 1:]
    expected = F.cross_entropy(logits[0, : n - 1], targets)
    assert alone.item() == pytest.approx(expected.item(), rel=1e-4)


def test_precomputed_clip_text_embeds_give_the_same_loss(model, processor):
    batch = processor(text=["a dog on the grass", "a red cat"])
    with torch.no_grad():
        embeds = model.clip.get_text_features(input_ids=batch["clip_input_ids"],
                                              attention_mask=batch["clip_attention_mask"]).pooler_output
    torch.manual_seed(3)
    from_ids = model(**batch).loss
    torch.manual_seed(3)
    from_cache = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"], clip_text_embeds=embeds).loss
    assert from_ids.item() == pytest.approx(from_cache.item(), rel=1e-6)


def test_only_the_projector_trains_by_default(model, processor):
    model.train()
    model(**processor(text=["a dog", "a cat on a table"])).loss.backward()
    grads = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert grads == {"projector"}
    assert all(p.requires_grad for p in model.projector.parameters())


def test_finetuning_the_lm_is_an_option(components):
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=components[1],
                                                                      freeze_lm=False, num_queries=4,
                                                                      aligner_heads=4, aligner_ffn_dim=32)
    assert all(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_image_conditioned_teacher_forcing(model, processor, images):
    """forward(pixel_values=...) uses the inference features and per-image noise: image 2 gets the same prefix
    alone as in a batch."""
    text = processor(text=["a dog", "a cat", "a man"])
    pixels = processor(images=images)["pixel_values"]
    with torch.no_grad():
        batched = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                        labels=text["labels"], pixel_values=pixels)
        alone = model(input_ids=text["input_ids"][2:], attention_mask=text["attention_mask"][2:],
                      pixel_values=pixels[2:])
        features = model.get_subregion_features(pixels).subregion_features
        clean = model.projector(F.normalize(features, dim=-1))
    assert torch.isfinite(batched.loss)
    torch.testing.assert_close(batched.prefix_embeds[2:], alone.prefix_embeds, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched.prefix_embeds, clean, atol=1e-3)  # inference noise was injected


def test_forward_without_a_condition_is_an_error(model, processor):
    batch = processor(text=["a dog"])
    with pytest.raises(ValueError, match="clip_input_ids, clip_text_embeds or pixel_values"):
        model(input_ids=batch["input_ids"])


# ------------------------------------------------------------------------------------------ generate, reranking
def clip_cosine(model, processor, caption, image):
    """CLIP cosine of one caption and one image, computed one at a time without padding."""
    tokens = processor.clip_tokenizer(caption, return_tensors="pt")
    with torch.no_grad():
        text = F.normalize(model.clip.get_text_features(**tokens).pooler_output, dim=-1)
        pixels = processor(images=image)["pixel_values"]
        img = F.normalize(model.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    return (text * img).sum().item()


def test_reranking_keeps_the_candidate_with_the_highest_clip_cosine(model, processor, images):
    out = model.generate(**processor(images=images), output_candidates=True)
    assert out.candidates.shape[:2] == (3, 4)
    distinct = 0
    for b, image in enumerate(images):
        texts = processor.batch_decode(out.candidates[b])
        scores = [clip_cosine(model, processor, text, image) for text in texts]
        assert out.candidate_scores[b].tolist() == pytest.approx(scores, abs=1e-5)
        best = max(range(4), key=scores.__getitem__)
        assert processor.batch_decode(out.sequences[b : b + 1]) == [texts[best]]
        distinct += len(set(scores)) > 1
    assert distinct >= 1  # the candidates really differ, so the choice means something


def test_a_batch_gives_the_same_captions_as_one_by_one(model, processor, images):
    batched = model.generate(**processor(images=images), output_candidates=True)
    for b, image in enumerate(images):
        alone = model.generate(**processor(images=[image]), output_candidates=True)
        assert processor.batch_decode(alone.candidates[0]) == processor.batch_decode(batched.candidates[b])
        torch.testing.assert_close(alone.candidate_scores[0], batched.candidate_scores[b], atol=1e-5, rtol=1e-5)
        assert processor.batch_decode(alone.sequences) == processor.batch_decode(batched.sequences[b : b + 1])


def test_noise_seed_controls_the_draws(model, processor, images):
    inputs = processor(images=images)
    a = model.generate(**inputs, output_candidates=True, noise_seed=0).candidate_scores
    b = model.generate(**inputs, output_candidates=True, noise_seed=0).candidate_scores
    c = model.generate(**inputs, output_candidates=True, noise_seed=1).candidate_scores
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_zero_inference_noise_makes_every_candidate_equal(make_model, processor, images):
    model = make_model(inference_noise_variance=0.0)
    out = model.generate(**processor(images=images), output_candidates=True)
    for b in range(3):
        assert len(set(processor.batch_decode(out.candidates[b]))) == 1


def test_num_candidates_and_rerank_switch(make_model, processor, images):
    model = make_model(num_candidates=3)
    assert model.generate(**processor(images=images), output_candidates=True).candidates.shape[:2] == (3, 3)
    assert model.generate(**processor(images=images), num_candidates=2,
                          output_candidates=True).candidates.shape[:2] == (3, 2)
    plain = make_model(rerank=False)
    plain.processor = None  # without reranking no tokenizer is needed
    out = plain.generate(**processor(images=images), output_candidates=True)
    assert out.candidate_scores is None and out.sequences.shape[0] == 3


def test_reranking_without_tokenizers_is_a_clear_error(model, processor, images):
    model.processor = None
    with pytest.raises(ValueError, match="reranking needs the tokenizers"):
        model.generate(**processor(images=images))
    assert model.generate(**processor(images=images), processor=processor).shape[0] == 3


def test_generate_defaults_come_from_the_generation_config(model, processor, images):
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (4, 16)
    seq = model.generate(**processor(images=images), rerank=False, min_new_tokens=16)
    assert seq.shape == (3, 1 + 16)  # [BOS | 16 new tokens]
    assert model.generate(**processor(images=images), rerank=False, max_new_tokens=3).shape[1] <= 4


def test_generate_returns_the_prompt_then_the_new_tokens(model, processor, images):
    inputs = processor(images=images[:2], text=["a photo of", "the"])
    seq = model.generate(**inputs, rerank=False, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(seq[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert seq.shape[1] == inputs["input_ids"].shape[1] + 5


def test_num_return_sequences_conflicts_with_reranking(model, processor, images):
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**processor(images=images), num_return_sequences=2)
    seq = model.generate(**processor(images=images), rerank=False, num_return_sequences=2)
    assert seq.shape[0] == 6


def test_vqa_prompts_follow_the_config_template(make_model):
    model = make_model(vqa_prompt="Q: {question} A:")
    assert model.format_vqa_prompts(["what colour is the dog? "]) == ["Q: what colour is the dog? A:"]


# ------------------------------------------------------------------- generate: shared prefix, chunked decoding
def reference_new_tokens(model, pixel_values, n, input_ids=None, attention_mask=None, seed=None, **generate_kwargs):
    """The new tokens of every candidate (images x n rows) from ONE plain call of the LM's generate on
    [prefix | prompt]: no cache shared by the beams, no chunking. The prefix is built here from the subregion
    features and each image's noise generator (its candidates draw from it in turn). `seed`: torch.manual_seed before decoding."""
    batch = pixel_values.shape[0]
    if input_ids is None:
        input_ids = torch.full((batch, 1), model.generation_config.bos_token_id)
        attention_mask = torch.ones_like(input_ids)
    variance = model.config.inference_noise_variance
    with torch.no_grad():
        features = model.get_subregion_features(pixel_values).subregion_features.repeat_interleave(n, 0)
        generators = [torch.Generator().manual_seed(image_seed(p, 0)) for p in pixel_values]
        noise = torch.stack([torch.randn(features.shape[1:], generator=g) for g in generators for _ in range(n)])
        prefix = model.projector(F.normalize(features + noise * variance**0.5, dim=-1))
        embeds = torch.cat([prefix, model.get_input_embeddings()(input_ids.repeat_interleave(n, 0))], 1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), attention_mask.repeat_interleave(n, 0)], 1)
        config = copy.deepcopy(model.generation_config)
        kwargs = config.update(**generate_kwargs)
        if seed is not None:
            torch.manual_seed(seed)
        lm = model.language_model  # the class's generate: a spy on the instance's does not see these calls
        return type(lm).generate(lm, inputs_embeds=embeds, attention_mask=mask, generation_config=config, **kwargs)


def spy_on_lm_calls(model, monkeypatch):
    """Record, for every call of the LM's generate: its rows, the cache it got (length and rows, at call time;
    None without one) and the width of its output."""
    calls = []
    real = model.language_model.generate

    def spy(**kwargs):
        cache = next((kwargs[name] for name in CACHE_ARGUMENTS if name in kwargs), None)
        length = None if cache is None else cache.get_seq_length()
        call = {"rows": kwargs["inputs_embeds"].shape[0], "cache": cache,
                "cache_shape": length and (cache.layers[0].keys.shape[0], length)}
        out = real(**kwargs)
        calls.append({**call, "width": out.shape[1]})
        return out

    monkeypatch.setattr(model.language_model, "generate", spy)
    return calls


VQA_DECODING = dict(num_beams=5, min_new_tokens=1, max_new_tokens=10, length_penalty=-1.0)


@pytest.mark.parametrize("num_beams", [3, 4])
def test_beam_search_candidates_equal_one_plain_lm_call(model, processor, images, monkeypatch, num_beams):
    pixel_values = processor(images=images)["pixel_values"]
    expected = reference_new_tokens(model, pixel_values, 3, num_beams=num_beams)
    calls = spy_on_lm_calls(model, monkeypatch)
    out = model.generate(pixel_values=pixel_values, num_candidates=3, num_beams=num_beams, output_candidates=True)
    assert torch.equal(out.candidates[:, :, 1:].flatten(0, 1), expected)
    # One call (9 x beams <= 128 rows), given the cache of prefix + BOS but the last position, once per beam.
    queries = model.config.num_queries
    assert [(c["rows"], c["cache_shape"]) for c in calls] == [(9, (9 * num_beams, queries))]


def test_left_padded_prompts_equal_one_plain_lm_call(model, processor, images, monkeypatch):
    """Prompts of different lengths, left-padded after the prefix (as VQA builds them): the prefill shared by the
    beams takes generate's positions (from the mask), so the tokens are one plain call's."""
    pixel_values = processor(images=images)["pixel_values"]
    input_ids, attention_mask = processor.prompt_inputs(["a photo of the dog on", "", "the red cat"])
    assert attention_mask[:, 0].tolist() == [1, 0, 0]  # really left-padded
    calls = spy_on_lm_calls(model, monkeypatch)
    expected = reference_new_tokens(model, pixel_values, 2, input_ids, attention_mask, num_beams=4)
    out = model.generate(pixel_values, input_ids, attention_mask, num_candidates=2, output_candidates=True)
    width = input_ids.shape[1]
    assert torch.equal(out.candidates[:, :, width:].flatten(0, 1), expected)
    assert torch.equal(out.candidates[:, :, :width], input_ids[:, None].expand(-1, 2, -1))
    expected = reference_new_tokens(model, pixel_values, 1, input_ids, attention_mask, **VQA_DECODING)
    sequences = model.generate(pixel_values, input_ids, attention_mask, rerank=False, **VQA_DECODING)
    assert torch.equal(sequences[:, width:], expected)
    queries = model.config.num_queries
    assert [c["cache_shape"] for c in calls] == [(24, queries + width - 1), (15, queries + width - 1)]


@pytest.mark.parametrize("num_beams,max_decode_rows,pad_token_id,fill", [
    (3, 3, 5, 5),  # one row a call; finished rows padded with the pad id
    (4, 8, None, 7),  # beam search pads with the first EOS (7) when the pad id is 0
    (1, 2, 5, 5),
    (1, 1, None, 0),  # greedy pads with the pad id (0)
])
def test_chunked_decoding_equals_one_call(make_model, processor, images, monkeypatch, num_beams, max_decode_rows,
                                          pad_token_id, fill):
    """Rows decoded max_decode_rows // beams at a time give one call's candidates, scores and kept captions, also
    when calls end at different lengths (EOS early in some rows): new tokens are padded as one call pads."""
    torch.manual_seed(0)  # a projector whose noisy prefixes make rows end at different lengths (checked below)
    model = make_model(inference_noise_variance=1.0)
    pixel_values = processor(images=images)["pixel_values"]
    evens = list(range(0, model.config.text_config.vocab_size, 2))  # every even id ends a row: rows end early
    kwargs = dict(num_beams=num_beams, max_new_tokens=8, eos_token_id=evens if pad_token_id else [7] + evens)
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    whole = model.generate(pixel_values=pixel_values, num_candidates=3, output_candidates=True, max_decode_rows=10**6,
                           **kwargs)
    calls = spy_on_lm_calls(model, monkeypatch)
    chunked = model.generate(pixel_values=pixel_values, num_candidates=3, output_candidates=True,
                             max_decode_rows=max_decode_rows, **kwargs)
    per_call = max(1, max_decode_rows // num_beams)
    assert [c["rows"] for c in calls] == [per_call] * (9 // per_call) + [9 % per_call] * (9 % per_call > 0)
    assert len({c["width"] for c in calls}) > 1  # the calls did end at different lengths
    assert torch.equal(chunked.candidates, whole.candidates)
    assert torch.equal(chunked.candidate_scores, whole.candidate_scores)
    assert torch.equal(chunked.sequences, whole.sequences)
    new_tokens = whole.candidates[:, :, 1:].flatten(0, 1)
    assert torch.equal(new_tokens, reference_new_tokens(model, pixel_values, 3, **kwargs))
    assert fill in new_tokens[:, -1]  # some rows were padded


def test_decode_rows_default_to_128_on_cpu_without_sampling(model, processor, images, monkeypatch):
    pixel_values = processor(images=images)["pixel_values"]
    calls = spy_on_lm_calls(model, monkeypatch)
    default = model.generate(pixel_values=pixel_values, num_candidates=11, output_candidates=True)
    assert [c["rows"] for c in calls] == [32, 1]  # 33 rows x 4 beams: 128 LM rows, then 4
    whole = model.generate(pixel_values=pixel_values, num_candidates=11, output_candidates=True, max_decode_rows=132)
    assert len(calls) == 3 and torch.equal(default.candidates, whole.candidates)
    model.generate(pixel_values=pixel_values, num_candidates=11, do_sample=True, max_new_tokens=2)
    assert calls[3]["rows"] == 33  # sampling: one call, so that the random draws are those of one call


def test_greedy_and_sampling_equal_one_plain_lm_call(model, processor, images, monkeypatch):
    pixel_values = processor(images=images)["pixel_values"]
    calls = spy_on_lm_calls(model, monkeypatch)
    greedy = model.generate(pixel_values=pixel_values, num_candidates=3, num_beams=1, output_candidates=True)
    assert torch.equal(greedy.candidates[:, :, 1:].flatten(0, 1),
                       reference_new_tokens(model, pixel_values, 3, num_beams=1))
    torch.manual_seed(3)
    sampled = model.generate(pixel_values=pixel_values, num_candidates=3, num_beams=1, do_sample=True,
                             output_candidates=True)
    assert torch.equal(sampled.candidates[:, :, 1:].flatten(0, 1),
                       reference_new_tokens(model, pixel_values, 3, seed=3, num_beams=1, do_sample=True))
    # Several sampled sequences per row, and beam sampling: the rows are expanded, so the prefix cache is shared.
    for kwargs in ({"num_beams": 1, "num_return_sequences": 3}, {"num_beams": 2}):
        torch.manual_seed(4)
        sequences = model.generate(pixel_values=pixel_values, rerank=False, do_sample=True, **kwargs)
        expected = reference_new_tokens(model, pixel_values, 1, seed=4, do_sample=True, **kwargs)
        assert torch.equal(sequences[:, 1:], expected)
    assert [c["cache_shape"] is None for c in calls] == [True, True, False, False]
    assert len({tuple(s) for s in sampled.candidates.flatten(0, 1).tolist()}) > 1


def test_own_cache_or_no_cache_take_the_plain_path(model, processor, images, monkeypatch):
    """With use_cache=False or the caller's own cache, the LM's generate gets exactly what it was given,
    in one call (the caller's cache serves one call), and decodes as before."""
    pixel_values = processor(images=images)["pixel_values"]
    expected = reference_new_tokens(model, pixel_values, 11)
    calls = spy_on_lm_calls(model, monkeypatch)
    no_cache = model.generate(pixel_values=pixel_values, num_candidates=11, use_cache=False, max_decode_rows=64,
                              output_candidates=True)
    cache = DynamicCache(config=model.language_model.config)
    name = cache_argument(model.language_model)  # cache= since transformers 5.24, past_key_values= before
    own = model.generate(pixel_values=pixel_values, num_candidates=11, output_candidates=True, **{name: cache})
    # use_cache=False: chunks of 16 rows (x 4 beams), no prefill; the caller's cache: as given, in one call.
    assert [c["rows"] for c in calls] == [16, 16, 1, 33]
    assert [c["cache"] is None for c in calls] == [True, True, True, False] and calls[3]["cache"] is cache
    assert torch.equal(no_cache.candidates[:, :, 1:].flatten(0, 1), expected)
    assert torch.equal(own.candidates[:, :, 1:].flatten(0, 1), expected)


@pytest.mark.parametrize("value", [0, -4, 2.5, "8", True])
def test_bad_max_decode_rows_are_refused(model, processor, images, value):
    with pytest.raises(ValueError, match="max_decode_rows must be a positive int or None, got"):
        model.generate(**processor(images=images), max_decode_rows=value)


# ---------------------------------------------------------------------------------------- other causal LMs
def test_any_causal_lm_can_be_the_decoder(components, processor):
    from transformers import CLIPConfig, OPTConfig

    from modeling_maccap import MacCapConfig

    clip_config = CLIPConfig.from_pretrained(components[0])
    opt = OPTConfig(vocab_size=300, hidden_size=24, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=24, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = MacCapConfig(clip_config=clip_config, text_config=opt, num_queries=4, aligner_heads=4, aligner_ffn_dim=32)
    model = MacCapForConditionalGeneration(config).eval()
    assert type(model.language_model).__name__ == "OPTForCausalLM"
    out = model(**processor(text=["a dog", "a cat"]))
    assert out.prefix_embeds.shape == (2, 4, 24) and torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------- save / load / dtypes
def test_save_and_load_round_trip_bit_exactly(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MacCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    source, target = model.state_dict(), loaded.state_dict()
    assert source.keys() == target.keys()
    assert all(torch.equal(source[k], target[k]) for k in source)
    without_path = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(loaded.config) == without_path(model.config)
    assert loaded.generation_config.num_beams == 4 and loaded.processor is not None
    inputs = processor(images=images)
    a, b = model.generate(**inputs, output_candidates=True), loaded.generate(**inputs, output_candidates=True)
    assert torch.equal(a.candidates, b.candidates) and torch.equal(a.candidate_scores, b.candidate_scores)


def test_weights_are_saved_as_safetensors_only(model, tmp_path):
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_and_captions(model, processor, images, tmp_path, dtype):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    half = MacCapForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in half.parameters()} == {dtype}
    inputs = processor(images=images)
    with torch.no_grad():
        full_features = model.get_subregion_features(inputs["pixel_values"]).subregion_features
        half_features = half.get_subregion_features(inputs["pixel_values"]).subregion_features
    torch.testing.assert_close(half_features, full_features, atol=0.05, rtol=0.05)
    seq = half.generate(**inputs, max_new_tokens=4)
    assert seq.shape[0] == 3 and seq.dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_on_cpu_half_precision_decodes_with_eager_attention_and_gives_sdpa_back(make_model, processor, images, dtype):
    """bfloat16/float16 on CPU: every LM forward of generate (prefill and beam search) runs eager attention, and the
    captions are those of the LM run eager throughout; float32 keeps SDPA. The LM has SDPA again after the call."""
    model = make_model().to(dtype)
    lm = model.language_model
    assert lm.config._attn_implementation == "sdpa"
    seen = []
    hooks = [module.register_forward_pre_hook(lambda *_: seen.append(lm.config._attn_implementation))
             for module in (lm, lm.base_model)]
    inputs = processor(images=images)
    switched = model.generate(**inputs, output_candidates=True)
    for hook in hooks:
        hook.remove()
    want = "sdpa" if dtype == torch.float32 else modeling.CPU_HALF_DECODE_ATTENTION
    assert seen and set(seen) == {want}
    assert lm.config._attn_implementation == "sdpa"
    lm.set_attn_implementation(want)
    throughout = model.generate(**inputs, output_candidates=True)
    assert torch.equal(switched.candidates, throughout.candidates)


def test_device_map_places_every_part(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    mapped = MacCapForConditionalGeneration.from_pretrained(tmp_path, device_map={"clip": "cpu", "projector": "cpu", "language_model": "cpu"}).eval()
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    inputs = processor(images=images)
    torch.testing.assert_close(mapped.generate(**inputs, output_candidates=True).candidate_scores,
                               model.generate(**inputs, output_candidates=True).candidate_scores)


def test_another_image_is_captioned_differently(model, processor):
    """Sanity check for every comparison above: the captioner's output depends on the image."""
    a = model.generate(**processor(images=[random_image(10)]), output_candidates=True).candidate_scores
    b = model.generate(**processor(images=[random_image(11)]), output_candidates=True).candidate_scores
    assert not torch.allclose(a, b)


def test_weights_without_processor_warn_and_still_caption_with_one_passed(model, processor, tmp_path, caplog):
    model.save_pretrained(tmp_path)  # no processor files
    loaded = MacCapForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.processor is None
    assert "reranking needs generate(..., processor=" in caplog.text
    inputs = processor(images=[random_image(1)])
    torch.testing.assert_close(loaded.generate(**inputs, processor=processor, output_candidates=True).candidate_scores,
                               model.generate(**inputs, output_candidates=True).candidate_scores)


def test_a_broken_processor_beside_the_weights_is_an_error_not_a_missing_processor(checkpoint):
    (checkpoint / "processor_config.json").write_text('{"max_caption_length": ')  # cut short: not JSON
    with pytest.raises((OSError, ValueError)):
        MacCapForConditionalGeneration.from_pretrained(checkpoint)

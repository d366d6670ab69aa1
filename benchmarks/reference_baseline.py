"""The baseline of benchmarks/generate_throughput.py: MacCap's captioning as the reference code (Artanic30/MacCap)
runs it, written here on this package's modules so that both timings do the same work on the same weights.

What the reference does, and this reproduces:
- one vision pass per candidate: each of the N candidates is its own `generate` call of one noisy draw per image,
  recomputing the subregion features; then one more vision pass for the image embedding that scores them;
- beam search from `inputs_embeds` = [prefix | BOS] with no shared prefill: the LM's `generate` expands the rows
  per beam, so every beam runs the whole prefix;
- CLIP reranking one image at a time, its N candidate texts padded to CLIP's 77-token context.

For the same noise it writes the same candidates, scores and picks as `MacCapForConditionalGeneration.generate`
(tests/test_reference_baseline.py): each image's noise comes from the generator `generate` seeds from its pixels,
and its candidates draw from it in turn, candidate c taking the c-th draw. Not shipped, not remote code.
"""

import copy

import torch
import torch.nn.functional as F

from modeling_maccap.transformers_compat import generate_pad_id

REFERENCE_TEXT_LENGTH = 77  # the reference tokenises with clip.tokenize, which pads every text to 77


@torch.no_grad()
def reference_generate(model, pixel_values, num_candidates=4, noise_seed=0, text_length=REFERENCE_TEXT_LENGTH,
                       **generate_kwargs):
    """Caption `pixel_values` the reference's way -> (sequences [BOS | new], candidates (batch, N, length),
    candidate_scores (batch, N) or None with one candidate, which is plain beam search without reranking)."""
    lm, processor = model.language_model, model.processor
    embed = model.get_input_embeddings()
    generators = model._image_generators(pixel_values, noise_seed)  # generate()'s: one per image, from its pixels
    bos = torch.full((pixel_values.shape[0], 1), model.generation_config.bos_token_id, device=embed.weight.device)
    gen_config = copy.deepcopy(model.generation_config)
    kwargs = gen_config.update(**generate_kwargs)
    new_tokens = []
    for _ in range(num_candidates):
        features = model.get_subregion_features(pixel_values).subregion_features  # this candidate's vision pass
        prefix = model._prefix_from_features(features, model.config.inference_noise_variance, generators)
        inputs_embeds = torch.cat([prefix.to(embed.weight.dtype), embed(bos)], dim=1)
        new_tokens.append(lm.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones(inputs_embeds.shape[:2],
                                      dtype=torch.long, device=bos.device), generation_config=gen_config, **kwargs))
    pad = generate_pad_id(gen_config)  # what generate() pads its shorter decoding calls with
    length = max(t.shape[1] for t in new_tokens)
    candidates = torch.stack([torch.cat([bos, F.pad(t, (0, length - t.shape[1]), value=pad)], 1) for t in new_tokens],
                             dim=1)
    if num_candidates == 1:
        return candidates[:, 0], candidates, None

    image_embeds = model.get_subregion_features(pixel_values).image_embeds  # the scoring pass
    scores = []
    for image, rows in zip(image_embeds, candidates):
        texts = processor.batch_decode(rows[:, 1:], skip_special_tokens=True)
        if model.config.rerank_max_characters is not None:
            texts = [t[: model.config.rerank_max_characters] for t in texts]
        tokens = processor.clip_tokenizer([t.strip() for t in texts], padding="max_length", truncation=True,
                                          max_length=text_length, return_tensors="pt")
        scores.append(model.get_text_embeds(tokens["input_ids"], tokens["attention_mask"]) @ image)
    scores = torch.stack(scores)
    best = candidates[torch.arange(len(candidates)), scores.argmax(-1)]
    return best, candidates, scores

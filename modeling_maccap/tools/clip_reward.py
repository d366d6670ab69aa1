"""The CLIP-relevance stage on unlabelled images (not shipped as remote code): self-critical policy gradient on the
projector, after Jin (2023, "Self-Supervised Image Captioning with CLIP") and Cho et al. (NAACL 2022, "Fine-grained
Image Captioning with CLIP Reward").

For each image: `num_samples` captions sampled from the current model (each from its own noisy prefix, as
`generate()` draws candidates), each rewarded with CLIPScore's scale, r = w * max(cos(image, caption), 0), w = 2.5,
the cosine computed by the model's own CLIP as reranking computes it (`score_captions`); a baseline b (the reward of
a greedy caption, as self-critical sequence training does, or the mean reward of the image's other samples); and
REINFORCE, loss = -mean((r - b) * log p(caption | prefix)). Guard against reward hacking: the per-token KL to the
starting model's next-token distributions on the sampled captions (`kl_weight`), and the supervised / text-only
cross-entropy mixed in by `recipes.py`.
"""

import torch

from ..modeling_maccap import noise_injection, sample_noise
from .evaluation import CLIPSCORE_WEIGHT

BASELINES = ("greedy", "mean")


def clip_rewards(model, captions, image_embeds, weight=CLIPSCORE_WEIGHT, processor=None):
    """w * max(cos, 0) of each caption with its image embedding, the cosine as reranking computes it."""
    with torch.no_grad():
        return weight * model.score_captions(captions, image_embeds, processor).clamp(min=0)


def baselines(rewards, kind, greedy_rewards=None):
    """The baseline of each sample, (images, samples): the image's greedy caption's reward ("greedy"), or the mean
    reward of the image's other samples ("mean", leave-one-out, so a sample's baseline never holds its own reward)."""
    if kind == "greedy":
        return greedy_rewards.view(-1, 1).expand_as(rewards)
    if kind == "mean":
        samples = rewards.shape[1]
        if samples < 2:
            raise ValueError("the 'mean' baseline needs num_samples >= 2")
        return (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")


def completion_mask(tokens, eos_token_id):
    """1 on each generated token up to and including its first EOS (what the policy chose), 0 on the padding after."""
    eos = torch.zeros_like(tokens, dtype=torch.bool)
    for token in eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]:
        eos |= tokens == token
    before = eos.long().cumsum(1) - eos.long()  # EOS tokens strictly before each position
    return (before == 0).long()


def lm_logits(model, prefix, input_ids):
    """The LM's logits on [prefix ; input_ids] at the text positions, as `forward` computes them."""
    embed = model.get_input_embeddings()
    input_ids = input_ids.to(embed.weight.device)
    prefix = prefix.to(embed.weight.device, embed.weight.dtype)
    inputs_embeds = torch.cat([prefix, embed(input_ids)], dim=1)
    return model.language_model(inputs_embeds=inputs_embeds).logits[:, prefix.shape[1]:].float()


def sequence_log_probs(logits, input_ids, mask):
    """Sum over the scored tokens (mask 1) of log p(token | everything before): logits[:, t] predicts token t + 1."""
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None].to(logits.device)).squeeze(-1)
    return (log_probs * mask[:, 1:].to(log_probs)).sum(-1)


def token_kl(logits, reference_logits, mask):
    """Mean over the scored positions of KL(p || p_ref) = sum_v p_v (log p_v - log p_ref,v) of the next-token
    distributions that chose tokens 1.. (mask as in `sequence_log_probs`)."""
    log_p = logits[:, :-1].log_softmax(-1)
    log_q = reference_logits[:, :-1].log_softmax(-1).to(log_p)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    scored = mask[:, 1:].to(kl)
    return (kl * scored).sum() / scored.sum().clamp(min=1)


def policy_gradient_loss(log_probs, advantages):
    """REINFORCE with a baseline: -mean(A * log p); the advantages carry no gradient."""
    return -(advantages.detach().to(log_probs) * log_probs).mean()


def _decode(model, prefix, sample, settings):
    rows = prefix.shape[0]
    prompt = torch.full((rows, 1), model.generation_config.bos_token_id, device=prefix.device)
    options = {"num_beams": 1, "do_sample": sample}
    if sample:  # the policy's own distribution: no top-k / top-p truncation
        options.update(top_k=0, top_p=1.0, temperature=settings.temperature)
    if settings.max_new_tokens is not None:
        options["max_new_tokens"] = settings.max_new_tokens
    with torch.no_grad():
        return model.decode_prefixes(prefix.detach(), prompt, torch.ones_like(prompt), **options)


def clip_reward_terms(model, pixel_values, settings, reference=None, processor=None):
    """The policy-gradient stage on a batch of images -> {"policy_gradient", "kl" (with a `reference` projector),
    "reward", "baseline", "greedy_reward" (detached statistics)}. `settings` has num_samples, baseline,
    reward_weight, temperature, max_new_tokens (a `recipes.RecipeSettings`)."""
    processor = processor or model.processor
    samples = settings.num_samples
    with torch.no_grad():
        subregions = model.get_subregion_features(pixel_values)
    features = subregions.subregion_features.repeat_interleave(samples, dim=0)
    image_embeds = subregions.image_embeds.repeat_interleave(samples, dim=0)
    # One noisy prefix per sample (inference noise, fresh from the global RNG), with the gradient kept: the same
    # prefix is the one sampled from and the one whose log-probability is pushed.
    noisy = noise_injection(features, sample_noise(features.shape, model.config.inference_noise_variance,
                                                   device=features.device))
    noisy = noisy.to(model.projector.queries.weight.device)
    prefix = model.projector(noisy)
    sequences = _decode(model, prefix, True, settings)  # [BOS | new tokens]
    captions = processor.batch_decode(sequences[:, 1:], skip_special_tokens=True)
    rewards = clip_rewards(model, captions, image_embeds, settings.reward_weight, processor).view(-1, samples)

    terms = {"reward": rewards.mean()}
    greedy_rewards = None
    if settings.baseline == "greedy":
        with torch.no_grad():
            greedy_prefix = model.noisy_prefixes(subregions.subregion_features, 1)
        greedy = _decode(model, greedy_prefix, False, settings)
        greedy_captions = processor.batch_decode(greedy[:, 1:], skip_special_tokens=True)
        greedy_rewards = clip_rewards(model, greedy_captions, subregions.image_embeds, settings.reward_weight,
                                      processor)
        terms["greedy_reward"] = greedy_rewards.mean()
    baseline = baselines(rewards, settings.baseline, greedy_rewards)
    terms["baseline"] = baseline.mean()

    mask = torch.cat([torch.ones_like(sequences[:, :1]),
                      completion_mask(sequences[:, 1:], model.generation_config.eos_token_id)], dim=1)
    logits = lm_logits(model, prefix, sequences)
    log_probs = sequence_log_probs(logits, sequences, mask)
    terms["policy_gradient"] = policy_gradient_loss(log_probs, (rewards - baseline).flatten())
    if reference is not None:
        with torch.no_grad():
            reference_logits = lm_logits(model, reference(noisy), sequences)
        terms["kl"] = token_kl(logits, reference_logits, mask)
    return terms

"""The CLIP-reward stage: reward and baselines against their formulas, the sequence log-probability and the KL
against the model's own forward, and one policy-gradient step moving probability towards the better caption."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_maccap.tools import clip_reward, recipes

from .test_supervised import CAPTIONS, write_images


@pytest.fixture
def quiet_model(make_model, processor):
    """A tiny MacCap with no dropout and almost no inference noise: a caption's probability given an image is a
    fixed function of the projector."""
    model = make_model(aligner_dropout=0.0, inference_noise_variance=0.0)
    model.processor = processor
    return model


def image_batch(folder, processor, count=2):
    return processor(images=[Image.open(p) for p in write_images(folder, count)])["pixel_values"]


def test_the_reward_is_clipscore_s_scale_of_the_cosine_reranking_computes(quiet_model, processor, tmp_path):
    pixel_values = image_batch(tmp_path, processor, 3)
    captions = ["a red dog", "the blue cat on the table", ""]
    with torch.no_grad():
        image_embeds = quiet_model.get_subregion_features(pixel_values).image_embeds
        rewards = clip_reward.clip_rewards(quiet_model, captions, image_embeds)
        # Independently: CLIP's own image and text features, L2-normalised; CLIPScore = 2.5 * max(cos, 0).
        image = F.normalize(quiet_model.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        tokens = processor.clip_tokenizer(captions, padding=True, return_tensors="pt")
        text = F.normalize(quiet_model.clip.get_text_features(**tokens).pooler_output, dim=-1)
    cosines = [float(image[i] @ text[i]) for i in range(3)]
    assert rewards.tolist() == pytest.approx([2.5 * max(c, 0.0) for c in cosines], abs=1e-5)
    assert any(c < 0 for c in cosines) or any(c > 0 for c in cosines)


def test_the_baselines_follow_their_formulas():
    rewards = torch.tensor([[0.5, 1.0, 2.0], [0.0, 0.3, 0.3]])
    greedy = torch.tensor([0.8, 0.1])
    got = clip_reward.baselines(rewards, "greedy", greedy).flatten().tolist()
    assert got == pytest.approx([0.8] * 3 + [0.1] * 3)
    loo = [(sum(row) - row[j]) / (len(row) - 1) for row in rewards.tolist() for j in range(len(row))]
    assert clip_reward.baselines(rewards, "mean").flatten().tolist() == pytest.approx(loo)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        clip_reward.baselines(rewards[:, :1], "mean")


def test_the_completion_mask_stops_after_the_first_eos():
    tokens = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 8, 0, 0], [4, 4, 4, 4, 4]])
    assert clip_reward.completion_mask(tokens, 0).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5]


def test_the_sequence_log_probability_is_minus_forward_s_summed_cross_entropy(quiet_model, processor, tmp_path):
    """sum of log p(token) over a caption (EOS included) = -(forward's mean CE x scored tokens), caption by caption."""
    pixel_values = image_batch(tmp_path, processor, 2)
    lm_inputs = processor.caption_lm_inputs(CAPTIONS[:2])
    with torch.no_grad():
        features = quiet_model.get_subregion_features(pixel_values).subregion_features
        prefix = quiet_model.projector(F.normalize(features, dim=-1))
        logits = clip_reward.lm_logits(quiet_model, prefix, lm_inputs["input_ids"])
        got = clip_reward.sequence_log_probs(logits, lm_inputs["input_ids"], lm_inputs["attention_mask"])
        for i in range(2):
            row = {k: v[i:i + 1] for k, v in lm_inputs.items()}
            out = quiet_model(**row, pixel_values=pixel_values[i:i + 1])
            scored = int((row["labels"] != -100).sum())
            assert float(got[i]) == pytest.approx(-out.loss.item() * scored, rel=1e-4)


def test_the_kl_follows_its_formula():
    g = torch.Generator().manual_seed(0)
    logits, reference = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    terms = []
    for b in range(2):
        for t in range(3):  # logits[:, t] chose token t + 1
            if mask[b, t + 1]:
                p, q = logits[b, t].softmax(-1).tolist(), reference[b, t].softmax(-1).tolist()
                terms.append(sum(pv * math.log(pv / qv) for pv, qv in zip(p, q)))
    assert float(clip_reward.token_kl(logits, reference, mask)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert float(clip_reward.token_kl(logits, logits, mask)) == pytest.approx(0.0, abs=1e-6)


def caption_log_probs(model, processor, pixel_values, captions):
    """log p(caption | image) of each caption by the model's forward (summed, EOS included)."""
    with torch.no_grad():
        out = []
        for caption in captions:
            inputs = processor.caption_lm_inputs([caption])
            loss = model(**inputs, pixel_values=pixel_values).loss.item()
            out.append(-loss * int((inputs["labels"] != -100).sum()))
    return out


def test_one_policy_gradient_step_moves_probability_to_the_higher_reward_caption(quiet_model, processor, tmp_path):
    """Two captions of one image with rewards 1.4 and 0.2 and the leave-one-out mean baseline: advantages +1.2 and
    -1.2; one SGD step on the REINFORCE loss raises the first caption's log-probability and lowers the second's."""
    pixel_values = image_batch(tmp_path, processor, 1)
    high, low = "a red dog", "the blue cat on the table"
    before = caption_log_probs(quiet_model, processor, pixel_values, [high, low])

    rewards = torch.tensor([[1.4, 0.2]])
    advantages = (rewards - clip_reward.baselines(rewards, "mean")).flatten()
    assert advantages.tolist() == pytest.approx([1.2, -1.2])
    lm_inputs = processor.caption_lm_inputs([high, low])
    features = quiet_model.get_subregion_features(pixel_values).subregion_features.repeat(2, 1, 1)
    prefix = quiet_model.projector(F.normalize(features, dim=-1))
    logits = clip_reward.lm_logits(quiet_model, prefix, lm_inputs["input_ids"])
    log_probs = clip_reward.sequence_log_probs(logits, lm_inputs["input_ids"], lm_inputs["attention_mask"])
    optimizer = torch.optim.SGD(quiet_model.projector.parameters(), lr=1e-3)
    clip_reward.policy_gradient_loss(log_probs, advantages).backward()
    assert all(p.grad is None for p in quiet_model.language_model.parameters())  # only the projector learns
    optimizer.step()

    after = caption_log_probs(quiet_model, processor, pixel_values, [high, low])
    assert after[0] > before[0] and after[1] < before[1]


def test_the_stage_s_terms_on_a_batch(quiet_model, processor, tmp_path):
    """With the reference equal to the policy (no dropout, no noise) the KL is 0; rewards lie in [0, 2.5]; the policy
    gradient carries a gradient to the projector only."""
    import copy

    pixel_values = image_batch(tmp_path, processor, 2)
    settings = recipes.RecipeSettings(name="clip-reward", images="unused", num_samples=3, baseline="mean",
                                      max_new_tokens=5)
    reference = copy.deepcopy(quiet_model.projector).requires_grad_(False)
    torch.manual_seed(0)
    terms = clip_reward.clip_reward_terms(quiet_model, pixel_values, settings, reference)
    assert float(terms["kl"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= float(terms["reward"]) <= 2.5
    assert float(terms["baseline"]) == pytest.approx(float(terms["reward"]), abs=1e-6)  # leave-one-out means average back
    terms["policy_gradient"].backward()
    assert any(p.grad is not None for p in quiet_model.projector.parameters())
    assert all(p.grad is None for p in quiet_model.clip.parameters())


def test_sampling_follows_max_new_tokens_and_the_temperature(quiet_model, processor, tmp_path):
    """At most max_new_tokens new tokens after BOS; at a temperature near 0 the samples are the greedy captions."""
    pixel_values = image_batch(tmp_path, processor, 2)
    with torch.no_grad():
        features = quiet_model.get_subregion_features(pixel_values).subregion_features
        prefix = quiet_model.projector(F.normalize(features, dim=-1))
    cold = recipes.RecipeSettings(name="clip-reward", images="unused", temperature=1e-4, max_new_tokens=6)
    torch.manual_seed(0)
    sampled = clip_reward._decode(quiet_model, prefix, True, cold)
    greedy = clip_reward._decode(quiet_model, prefix, False, cold)
    assert sampled.shape[1] <= 1 + 6 and sampled[:, 0].tolist() == [quiet_model.generation_config.bos_token_id] * 2
    assert sampled.tolist() == greedy.tolist()
    hot = recipes.RecipeSettings(name="clip-reward", images="unused", temperature=50.0, max_new_tokens=6)
    draws = {tuple(clip_reward._decode(quiet_model, prefix[:1], True, hot)[0].tolist()) for _ in range(5)}
    assert len(draws) > 1  # a high temperature spreads the samples

"""The benchmark's baseline (benchmarks/reference_baseline.py) does the reference code's work and writes what
`generate()` writes, so that timing the two compares the same captions."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_baseline import reference_generate  # noqa: E402


@pytest.mark.parametrize("num_candidates", [4, 3])
def test_the_baseline_writes_generate_s_candidates_scores_and_picks(make_model, processor, images, num_candidates):
    torch.manual_seed(0)  # the projector's initialisation, whatever the tests before this one drew
    model = make_model(inference_noise_variance=1.0)  # noise large enough that the tiny LM's candidates differ
    pixel_values = processor(images=images)["pixel_values"]
    out = model.generate(pixel_values=pixel_values, num_candidates=num_candidates, output_candidates=True,
                         noise_seed=5)
    best, candidates, scores = reference_generate(model, pixel_values, num_candidates, noise_seed=5)
    for b in range(len(images)):
        assert processor.batch_decode(candidates[b]) == processor.batch_decode(out.candidates[b])
    # Padding the texts to CLIP's context changes no embedding: the attention mask hides the padding.
    torch.testing.assert_close(scores, out.candidate_scores, atol=1e-5, rtol=1e-5)
    assert processor.batch_decode(best) == processor.batch_decode(out.sequences)
    assert len({tuple(row.tolist()) for row in candidates.flatten(0, 1)}) > len(images)  # the draws differ


def test_with_one_candidate_the_baseline_is_plain_beam_search_as_generate_without_reranking(model, processor, images):
    pixel_values = processor(images=images)["pixel_values"]
    best, _, scores = reference_generate(model, pixel_values, 1, noise_seed=2)
    assert scores is None
    assert processor.batch_decode(best) == processor.batch_decode(
        model.generate(pixel_values=pixel_values, rerank=False, noise_seed=2))


def test_the_baseline_runs_one_vision_pass_per_candidate_and_scores_one_image_at_a_time_at_77_tokens(
        model, processor, images, monkeypatch):
    vision_calls, text_shapes = [], []
    subregions, text_embeds = model.get_subregion_features, model.get_text_embeds
    monkeypatch.setattr(model, "get_subregion_features", lambda p: vision_calls.append(len(p)) or subregions(p))
    monkeypatch.setattr(model, "get_text_embeds",
                        lambda ids, mask=None: text_shapes.append(tuple(ids.shape)) or text_embeds(ids, mask))
    assert processor.clip_tokenizer.model_max_length == 77  # the tiny CLIP has the real context
    reference_generate(model, processor(images=images)["pixel_values"], 4)
    assert vision_calls == [len(images)] * 5  # 4 candidates, then the scoring pass
    assert text_shapes == [(4, 77)] * len(images)

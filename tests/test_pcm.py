"""PCM-Net: salient concepts, the joint (patch, concept) selection, mix-up, the CLIP-weighted loss, the concept
vocabulary and its cache, and a PCM-trained model that captions as remote code in a fresh process. Every
computation is checked against the formula written here."""

import json
import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from modeling_maccap import MacCapConfig
from modeling_maccap.modeling_maccap import patch_concept_features, salient_concepts, selected_patches
from modeling_maccap.tools import pcm
from modeling_maccap.tools.errors import MacCapError

from .conftest import random_image
from .test_remote_code import fresh_process

WORDS = ["dog", "cat", "red", "blue", "grass", "table", "man"]


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------------------------------ the three scores
def test_salient_concepts_are_the_top_of_softmax_cos_over_temperature():
    images, concepts = torch.randn(3, 8) * 3, torch.randn(11, 8) * 2  # not normalised: the function normalises
    probs, ids = salient_concepts(images, concepts, 5, 0.01)
    for b in range(3):
        cos = [float(images[b] @ concepts[c] / images[b].norm() / concepts[c].norm()) for c in range(11)]
        z = sum(math.exp((x - max(cos)) / 0.01) for x in cos)
        p = [math.exp((x - max(cos)) / 0.01) / z for x in cos]
        order = sorted(range(11), key=lambda c: -p[c])[:5]
        assert ids[b].tolist() == order
        assert probs[b].tolist() == pytest.approx([p[c] for c in order], rel=1e-4, abs=1e-6)


def test_patch_concept_feature_is_the_softmax_mix_of_the_concepts():
    patches, concepts = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    sim, v = patch_concept_features(patches, concepts, 0.05)
    for b in range(2):
        for p in range(6):
            cos = torch.tensor([float(F.cosine_similarity(patches[b, p], concepts[b, c], dim=0)) for c in range(5)])
            assert sim[b, p].tolist() == pytest.approx(cos.tolist(), abs=1e-5)
            w = torch.exp(cos / 0.05 - (cos / 0.05).max())
            w = w / w.sum()
            expected = sum(w[c] * concepts[b, c] / concepts[b, c].norm() for c in range(5))
            assert torch.allclose(v[b, p], expected, atol=1e-5)


def test_selection_takes_the_patches_of_the_top_pairs_of_one_joint_softmax():
    sim = torch.tensor([[[0.9, 0.1], [0.2, 0.85], [0.3, 0.4], [0.88, 0.87]]])  # 4 patches x 2 concepts
    # Pairs by score: (0,0) .9, (3,0) .88, (3,1) .87, (1,1) .85, (2,1) .4 ...; the top 3 hold patches 0 and 3.
    assert selected_patches(sim, 3, 0.01)[0].tolist() == [True, False, False, True]
    assert selected_patches(sim, 4, 0.01)[0].tolist() == [True, True, False, True]
    # A softmax is monotonic, so at any temperature the top pairs are those of the highest cosines.
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(5, 16, 5, generator=g) * 2 - 1
    mask = selected_patches(sim, 5, 0.01)
    for b in range(5):
        pairs = sorted(((float(sim[b, p, c]), p) for p in range(16) for c in range(5)), reverse=True)[:5]
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == {p for _, p in pairs}


def test_mixup_replaces_exactly_the_selected_patches():
    e, c = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    selected = torch.tensor([[True, False, False, True], [False, False, True, False]])
    out = pcm.mixup(e, c, selected)
    for b in range(2):
        for p in range(4):
            m = float(selected[b, p])
            assert torch.allclose(out[b, p], e[b, p] * (1 - m) + c[b, p] * m)


def test_clip_weights_clamp_alpha_times_the_cosine():
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    cos = F.cosine_similarity(image, text, dim=-1)
    expected = [min(max(2.5 * float(x), 0.0), 1.0) for x in cos]
    assert pcm.clip_weights(image, text, 2.5).tolist() == pytest.approx(expected, abs=1e-6)
    same = pcm.clip_weights(image, image, 4.0)
    assert same.tolist() == pytest.approx([1.0] * 6)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_weighted_loss_is_label_smoothed_focal_cross_entropy_times_the_pair_weight(gamma):
    g = torch.Generator().manual_seed(0)
    logits, vocab = torch.randn(2, 5, 7, generator=g), 7
    labels = torch.tensor([[-100, 3, 1, 4, -100], [-100, 2, -100, -100, -100]])
    weights = torch.tensor([0.4, 0.9])
    eps = 0.1
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            logp = torch.log_softmax(logits[b, t], -1)
            ce = -(1 - eps) * float(logp[y]) - eps / vocab * float(logp.sum())
            focal = (1 - math.exp(float(logp[y]))) ** gamma
            total += float(weights[b]) * focal * ce
            count += 1
    loss = pcm.weighted_caption_loss(logits, labels, weights, label_smoothing=eps, focal_gamma=gamma)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    plain = pcm.weighted_caption_loss(logits, labels, None, label_smoothing=0.0)
    assert float(plain) == pytest.approx(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())),
                                         rel=1e-5)


def test_settings_default_to_the_paper_and_refuse_bad_values():
    s = pcm.PCMSettings()
    assert (s.mixup, s.weighted_loss, s.clip_weight_alpha, s.label_smoothing, s.feature_noise_variance) == (
        True, True, 2.5, 0.1, 0.016)
    assert s.focal_gamma == 0.0
    with pytest.raises(MacCapError, match="label_smoothing"):
        pcm.PCMSettings(label_smoothing=1.0)
    with pytest.raises(MacCapError, match="focal_gamma"):
        pcm.PCMSettings(focal_gamma=-1)


# ------------------------------------------------------------------------------------------------- the model
def test_config_fields_default_off_and_are_checked():
    from huggingface_hub.errors import StrictDataclassError

    c = MacCapConfig()
    assert (c.patch_keys, c.concepts, c.salient_concepts, c.concept_pairs, c.concept_temperature,
            c.concept_tokens) == (False, None, 5, 5, 0.01, True)
    with pytest.raises(StrictDataclassError, match="concepts need patch_keys"):
        MacCapConfig(concepts=["dog"])
    with pytest.raises(StrictDataclassError, match="distinct"):
        MacCapConfig(patch_keys=True, concepts=["dog", "dog"], salient_concepts=1)
    with pytest.raises(StrictDataclassError, match="exceeds"):
        MacCapConfig(patch_keys=True, concepts=["dog", "cat"])
    with pytest.raises(StrictDataclassError, match="concept_temperature"):
        MacCapConfig(concept_temperature=0)


@pytest.fixture
def pcm_model(make_model):
    model = make_model(patch_keys=True, concepts=WORDS, salient_concepts=3, concept_pairs=4)
    with torch.no_grad():
        model.concept_embeds.copy_(unit(len(WORDS), model.config.projector_dim, seed=5))
    return model


def test_default_model_has_no_pcm_parts(model):
    assert not hasattr(model, "concept_embeds") and not hasattr(model, "concept_projection")
    assert not any("concept" in k for k in model.state_dict())


def test_model_concepts_follow_the_formulas(pcm_model, processor, images):
    sub = pcm_model.get_subregion_features(processor(images=images)["pixel_values"])
    out = pcm_model.get_concept_features(sub)
    t = pcm_model.concept_embeds
    for b in range(len(images)):
        cos = F.normalize(sub.image_embeds[b], dim=-1) @ t.T
        assert out.concept_ids[b].tolist() == cos.argsort(descending=True)[:3].tolist()
        patches = sub.token_embeds[b, 1:]
        sim = patches @ t[out.concept_ids[b]].T  # both unit vectors
        pairs = sorted(((float(sim[p, c]), p) for p in range(sim.shape[0]) for c in range(3)), reverse=True)[:4]
        assert set(torch.nonzero(out.selected[b]).flatten().tolist()) == {p for _, p in pairs}
        assert torch.allclose(out.concept_features[b], (sim / 0.01).softmax(-1) @ t[out.concept_ids[b]], atol=1e-5)


def test_inference_keys_are_patches_then_the_selected_patches_concept_tokens(pcm_model, processor, images):
    pixel_values = processor(images=images[:1])["pixel_values"]
    sub = pcm_model.get_subregion_features(pixel_values)
    keys, mask = pcm_model.extra_aligner_keys(sub)
    concepts = pcm_model.get_concept_features(sub)
    patches = sub.token_embeds[:, 1:]
    tokens = pcm_model.concept_projection(concepts.concept_features)
    assert torch.allclose(keys, torch.cat([patches, tokens], 1), atol=1e-6)
    assert mask.tolist() == [[False] * patches.shape[1] + (~concepts.selected[0]).tolist()]
    # A masked key is no key: the prefix equals the projector's on the unmasked keys alone.
    g = [torch.Generator().manual_seed(1)]
    with torch.no_grad():
        prefix = pcm_model._prefix_from_features(sub.subregion_features, 0.0, g, (keys, mask))
        kept = torch.cat([sub.subregion_features / sub.subregion_features.norm(dim=-1, keepdim=True),
                          patches, tokens[:, concepts.selected[0]]], 1)
        assert torch.allclose(prefix, pcm_model.projector(kept), atol=1e-5)
    pcm_model.config.concept_tokens = False
    keys, mask = pcm_model.extra_aligner_keys(sub)
    assert mask is None and torch.equal(keys, patches)


def test_patch_keys_change_the_prefix_and_generate_captions(make_model, processor, images):
    plain, keyed = make_model(), make_model(patch_keys=True)
    keyed.load_state_dict(plain.state_dict())
    inputs = processor(images=images)
    sub = plain.get_subregion_features(inputs["pixel_values"])
    with torch.no_grad():
        a = plain.noisy_prefixes(sub.subregion_features, 2)
        torch.manual_seed(0)
        b = keyed.noisy_prefixes(sub.subregion_features, 2, extra_keys=keyed.extra_aligner_keys(sub))
    assert a.shape == b.shape and not torch.allclose(a, b)
    out = keyed.generate(**inputs, output_candidates=True)
    assert out.candidates.shape[:2] == (3, 4) and out.candidate_scores.shape == (3, 4)


def test_training_keys_mix_up_the_selected_patches(pcm_model, processor, images):
    pixel_values = processor(images=images)["pixel_values"]
    settings = pcm.PCMSettings(feature_noise_variance=0.0)
    keys, image_embeds = pcm.aligner_keys(pcm_model, pixel_values, settings)
    sub = pcm_model.get_subregion_features(pixel_values)
    concepts = pcm_model.get_concept_features(sub)
    k = pcm_model.config.num_subregions
    e, c = sub.token_embeds[:, 1:], pcm_model.concept_projection(concepts.concept_features)
    m = concepts.selected.unsqueeze(-1).float()
    assert torch.allclose(keys[:, :k], F.normalize(sub.subregion_features, dim=-1), atol=1e-6)
    assert torch.allclose(keys[:, k:], e * (1 - m) + c * m, atol=1e-6)
    assert torch.equal(image_embeds, sub.image_embeds)
    off, _ = pcm.aligner_keys(pcm_model, pixel_values, pcm.PCMSettings(feature_noise_variance=0.0, mixup=False))
    assert torch.allclose(off[:, k:], e, atol=1e-6)


# ------------------------------------------------------------------------------------------- the vocabulary
def test_default_vocabulary_and_a_users_list(tmp_path):
    default = pcm.read_concepts()
    assert len(default) == len(set(default)) > 150 and "dog" in default and "person" in default
    words = tmp_path / "words.txt"
    words.write_text("# mine\nred circle\n\n blue square \n")
    assert pcm.read_concepts(words) == ["red circle", "blue square"]
    words.write_text("dog\ncat\ndog\n")
    with pytest.raises(MacCapError, match="repeated concepts dog"):
        pcm.read_concepts(words)
    words.write_text("# nothing\n")
    with pytest.raises(MacCapError, match="no concept"):
        pcm.read_concepts(words)


def test_concept_embeddings_are_prompt_ensembled_and_cached(model, processor, tmp_path, monkeypatch):
    templates = ("a photo of a {}.", "{}", "a {} on the table")
    embeds = pcm.concept_embeddings(model, processor, ["dog", "red cat"], templates, cache_dir=tmp_path)
    for i, concept in enumerate(["dog", "red cat"]):
        with torch.no_grad():
            each = model.embed_texts([t.format(concept) for t in templates], processor)
        mean = each.mean(0)
        assert torch.allclose(embeds[i], mean / mean.norm(), atol=1e-5)
    monkeypatch.setattr(type(model), "embed_texts", lambda *a, **k: pytest.fail("the cache was not used"))
    again = pcm.concept_embeddings(model, processor, ["dog", "red cat"], templates, cache_dir=tmp_path)
    assert torch.equal(again, embeds)
    with pytest.raises(MacCapError, match="must each contain"):
        pcm.concept_embeddings(model, processor, ["dog"], ("no slot",), cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- training
def tiny_pairs(count=12):
    captions = ["a red dog on the grass", "a blue cat on a table", "a man with a dog", "the cat in the grass"]
    return datasets.Dataset.from_dict({
        "image": [random_image(100 + i) for i in range(count)],
        "caption": [captions[i % len(captions)] for i in range(count)],
    }).cast_column("image", datasets.Image())


TINY_ARGS = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=0, logging_steps=1,
                 disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True)


def test_pcm_trained_model_captions_as_remote_code_in_a_fresh_process(components, tmp_path):
    from modeling_maccap import MacCapForConditionalGeneration
    from modeling_maccap.tools.tiny import TINY_MACCAP

    clip_dir, lm_dir = components
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))
    out = pcm.train_pcm(tiny_pairs(), tmp_path / "pcm", clip=clip_dir, lm=lm_dir, concepts=words,
                        templates=("a {}", "{}"), maccap={**TINY_MACCAP, "salient_concepts": 3},
                        training_arguments=TINY_ARGS, cache_dir=tmp_path / "cache")
    assert not (out / "training_args.bin").exists()
    assert json.loads((out / "pcm_settings.json").read_text())["clip_weight_alpha"] == 2.5
    model = MacCapForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.concepts == WORDS and model.config.patch_keys
    with torch.no_grad():
        expected_embeds = pcm.concept_embeddings(model, model.processor, WORDS, ("a {}", "{}"), tmp_path / "cache")
    assert torch.allclose(model.concept_embeds, expected_embeds, atol=1e-6)  # saved with the weights
    image_paths = []
    for i in range(3):
        image_paths.append(str(tmp_path / f"{i}.png"))
        random_image(40 + i).save(image_paths[-1])
    from PIL import Image

    images = [Image.open(p) for p in image_paths]
    out_candidates = model.generate(**model.processor(images=images), output_candidates=True)
    scores = out_candidates.candidate_scores
    kept = model.processor.batch_decode(out_candidates.sequences)
    best = [model.processor.batch_decode(out_candidates.candidates[b])[int(scores[b].argmax())] for b in range(3)]
    assert kept == best  # reranked: the candidate with the highest CLIP cosine
    result = fresh_process(str(out), image_paths, tmp_path)
    assert result["captions"] == kept
    assert [r[0]["generated_text"] for r in result["pipe_list"]] == kept


def test_every_switch_off_trains_a_plain_patch_key_model(components, tmp_path):
    from modeling_maccap import MacCapForConditionalGeneration
    from modeling_maccap.tools.tiny import TINY_MACCAP

    clip_dir, lm_dir = components
    settings = pcm.PCMSettings(mixup=False, weighted_loss=False)
    out = pcm.train_pcm(tiny_pairs(8), tmp_path / "plain", clip=clip_dir, lm=lm_dir, settings=settings,
                        maccap=TINY_MACCAP, training_arguments={**TINY_ARGS, "max_steps": 1})
    model = MacCapForConditionalGeneration.from_pretrained(out)
    assert model.config.patch_keys and model.config.concepts is None and not hasattr(model, "concept_embeds")


def test_pcm_loss_weights_each_pair_by_its_clip_cosine(pcm_model, processor, images, monkeypatch):
    captions = ["a red dog", "a blue cat on a table", "a man"]
    collate = pcm.PairCollator(processor)
    batch = collate([{"image": im, "caption": c} for im, c in zip(images, captions)])
    settings = pcm.PCMSettings(label_smoothing=0.0, feature_noise_variance=0.0)
    pcm_model.eval()
    loss, logits, weights = pcm.pcm_loss(pcm_model, batch, settings)
    with torch.no_grad():
        image = pcm_model.get_subregion_features(batch["pixel_values"]).image_embeds
        text = pcm_model.embed_texts(captions, processor)
    expected_w = (2.5 * (image * text).sum(-1)).clamp(0, 1)
    assert torch.allclose(weights, expected_w, atol=1e-6)
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, reduction="none", ignore_index=-100)
    expected = (ce * expected_w[:, None]).sum() / (labels != -100).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_cli_train_pcm_reads_pairs_and_refuses_a_bad_field(components, tmp_path):
    from modeling_maccap.tools.cli import main

    clip_dir, lm_dir = components
    tiny_pairs(8).save_to_disk(str(tmp_path / "pairs"))
    args = ["train-pcm", str(tmp_path / "pairs"), "--clip", clip_dir, "--lm", lm_dir, "--output-dir",
            str(tmp_path / "m"), "--no-mixup", "--max-steps", "1", "--set", "per_device_train_batch_size=4",
            "--set", "use_cpu=true", "--set", "disable_tqdm=true"]
    maccap = ["--maccap", "num_queries=4", "--maccap", "aligner_heads=4", "--maccap", "aligner_ffn_dim=32"]
    assert main(args + maccap) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert main(args[:-6] + ["--output-dir", str(tmp_path / "m2"), "--maccap", "num_queries=0"]) == 2


def test_onnx_export_refuses_a_patch_key_model(pcm_model, tmp_path):
    from modeling_maccap.tools.onnx_export import export_onnx

    with pytest.raises(MacCapError, match="patch_keys"):
        export_onnx(pcm_model, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_pcm_fields_round_trip_through_save_and_load(tmp_path):
    values = dict(patch_keys=True, concepts=["red circle", "blue"], salient_concepts=2, concept_pairs=3,
                  concept_temperature=0.05, concept_tokens=False)
    MacCapConfig(**values).save_pretrained(tmp_path)
    loaded = MacCapConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in values} == values

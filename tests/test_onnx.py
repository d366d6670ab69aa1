"""`maccap export-onnx` and `OnnxMacCapCaptioner`: every graph against its PyTorch module, and captions (rerank on and
off, several candidates) equal to `generate()`'s on the tiny random model, float32."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime 1.32 needs Python 3.11 or newer)")

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.tools.cli import main
from modeling_maccap.tools.errors import MacCapError
from modeling_maccap.tools.onnx_export import GRAPHS, MANIFEST, compare_graphs
from modeling_maccap.tools.onnx_runtime import OnnxMacCapCaptioner, check_export_folder
from modeling_maccap.tools.tiny import TINY_MACCAP
from modeling_maccap.transformers_compat import cache_argument

from .conftest import random_image

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def saved(components, tmp_path_factory):
    """A tiny MacCap checkpoint folder (model and processor), and the model loaded back from it."""
    clip_dir, lm_dir = components
    folder = tmp_path_factory.mktemp("onnx") / "maccap-tiny"
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=clip_dir, lm=lm_dir, **TINY_MACCAP)
    model.save_pretrained(folder)
    model.processor.save_pretrained(folder)
    return folder, MacCapForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def exported(saved):
    """The checkpoint exported by the command line: (export folder, its stdout)."""
    folder, _ = saved
    out = folder.parent / "maccap-tiny-onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export-onnx", str(folder), str(out)]) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def captioner(exported):
    return OnnxMacCapCaptioner.from_folder(exported[0])


@pytest.fixture(scope="module")
def pixel_values(saved):
    images = [random_image(seed, size) for seed, size in ((0, (48, 40)), (1, (64, 30)), (2, (20, 50)), (3, (32, 32)))]
    return saved[1].processor(images=images)["pixel_values"]


def ort_run(captioner, graph, **feeds):
    return [out.numpy() for out in captioner.graphs[graph](**feeds)]


def test_cli_writes_a_self_contained_export_folder(exported, saved):
    out, stdout = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["graphs"]) == set(GRAPHS)
    for name in GRAPHS:
        assert (out / manifest["graphs"][name]["file"]).is_file()
        assert f"{name}: largest difference from PyTorch" in stdout
    for name in ("config.json", "generation_config.json", "processor_config.json",
                 "language_model/generation_config.json"):
        assert (out / name).is_file()
    assert all((out / file).is_file() for file in manifest["files"])
    model = saved[1]
    assert manifest["graphs"]["vision"] == {"file": "vision.onnx", "inputs": ["pixel_values"],
                                            "outputs": ["image_embeds", "subregion_features"]}
    layers = model.config.text_config.num_hidden_layers
    assert manifest["lm_layers"] == layers
    assert manifest["graphs"]["lm_decode"]["inputs"][3:] == [f"past.{i}.{p}" for i in range(layers)
                                                            for p in ("key", "value")]
    assert max(manifest["max_abs_diff"].values()) <= TOLERANCE
    loaded = OnnxMacCapCaptioner.from_folder(out)
    def settings(config):
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}

    assert settings(loaded.config) == settings(model.config)
    assert loaded.generation_config.to_dict() == model.generation_config.to_dict()


def test_export_refuses_a_non_empty_folder_without_overwrite(saved, tmp_path, capsys):
    (tmp_path / "x.txt").write_text("keep me")
    assert main(["export-onnx", str(saved[0]), str(tmp_path)]) == 2
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "x.txt").read_text() == "keep me"


@pytest.mark.parametrize("batch", [1, 3])
def test_every_graph_matches_its_pytorch_module(exported, saved, batch):
    diffs = compare_graphs(saved[1], exported[0], batch=batch, seed=batch)
    assert set(diffs) == set(GRAPHS)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_vision_projector_and_clip_text_graphs_on_real_inputs(captioner, saved, pixel_values):
    model = saved[1]
    with torch.no_grad():
        want = model.get_subregion_features(pixel_values)
        image_embeds, features = ort_run(captioner, "vision", pixel_values=pixel_values)
        assert np.abs(image_embeds - want.image_embeds.numpy()).max() <= TOLERANCE
        assert np.abs(features - want.subregion_features.numpy()).max() <= TOLERANCE
        noisy = torch.nn.functional.normalize(want.subregion_features + 0.1 * torch.randn(features.shape), dim=-1)
        (prefix,) = ort_run(captioner, "projector", features=noisy)
        assert np.abs(prefix - model.projector(noisy).numpy()).max() <= TOLERANCE
        texts = ["a dog on the grass", "the red cat", "a"]
        tokens = model.processor.clip_text_inputs(texts)
        assert tokens["attention_mask"].min() == 0  # padded texts among them
        (text,) = ort_run(captioner, "clip_text", input_ids=tokens["input_ids"],
                          attention_mask=tokens["attention_mask"])
        assert np.abs(text - model.embed_texts(texts).numpy()).max() <= TOLERANCE


def test_lm_prefill_then_decode_steps_give_the_full_forward_logits(captioner, saved):
    """Independent of the export's wrapper: the prefill graph on the first positions, then the decode graph one
    position at a time on the presents it returned, against one PyTorch forward over the whole left-padded rows."""
    lm = saved[1].language_model
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 7, lm.config.n_embd, generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2], mask[2, :1] = 0, 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        full = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    start = 4
    logits, *present = ort_run(captioner, "lm_prefill", inputs_embeds=embeds[:, :start], attention_mask=mask[:, :start],
                               position_ids=positions[:, :start])
    assert np.abs(logits[:, 0] - full[:, start - 1].numpy()).max() <= TOLERANCE
    names = captioner.graphs["lm_decode"].inputs[3:]
    for t in range(start, 7):
        feeds = {"inputs_embeds": embeds[:, t:t + 1], "attention_mask": mask[:, :t + 1],
                 "position_ids": positions[:, t:t + 1], **dict(zip(names, map(torch.from_numpy, present)))}
        logits, *present = ort_run(captioner, "lm_decode", **feeds)
        assert present[0].shape[2] == t + 1
        assert np.abs(logits[:, 0] - full[:, t].numpy()).max() <= TOLERANCE
    # And the presents are the LM's own cache, at the positions the mask keeps.
    with torch.no_grad():
        cache = getattr(lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True),
                        cache_argument(lm))
    assert isinstance(cache, DynamicCache)
    keep = mask.bool().numpy()
    for layer, (key, value) in enumerate(zip(present[::2], present[1::2])):
        want = cache.layers[layer]
        for have, ref in ((key, want.keys), (value, want.values)):
            assert np.abs(have.transpose(0, 2, 1, 3)[keep] - ref.numpy().transpose(0, 2, 1, 3)[keep]).max() <= TOLERANCE


@pytest.mark.parametrize("kwargs", [
    {},  # the default path: reranked candidates (4)
    {"num_candidates": 2},
    {"num_candidates": 3, "noise_seed": 5},
    {"rerank": False},
    {"rerank": False, "num_beams": 1},
], ids=["rerank-4", "rerank-2", "rerank-3-seed5", "no-rerank", "greedy"])
def test_captions_equal_pytorch_generate(captioner, saved, pixel_values, kwargs):
    model = saved[1]
    want = model.generate(pixel_values, output_candidates=True, **kwargs)
    have = captioner.generate(pixel_values, output_candidates=True, **kwargs)
    assert torch.equal(have.sequences, want.sequences)
    assert model.processor.batch_decode(have.sequences) == model.processor.batch_decode(want.sequences)
    if kwargs.get("rerank", True):
        assert have.candidates.shape[1] == kwargs.get("num_candidates", model.config.num_candidates) >= 2
        assert torch.equal(have.candidates, want.candidates)
        assert (have.candidate_scores - want.candidate_scores).abs().max() <= TOLERANCE
        # The random LM's candidates differ, so reranking has something to choose from.
        assert any(len(set(map(tuple, row.tolist()))) > 1 for row in want.candidates)
    # One image alone gets the caption it gets in the batch (per-image noise), from a batch of 1.
    alone = captioner.generate(pixel_values[1:2], **kwargs)
    assert torch.equal(alone, want.sequences[1:2, :alone.shape[1]])


def test_caption_helper_and_vqa_answers_equal_pytorch(captioner, saved):
    model = saved[1]
    images = [random_image(7), random_image(8, (30, 60))]
    inputs = model.processor(images=images)
    assert captioner.caption(images) == model.processor.batch_decode(model.generate(**inputs))
    questions = ["what is on the table?", "is there a dog in the photo of the grass?"]  # left-padded prompts
    assert captioner.answer(inputs["pixel_values"], questions) == model.answer(inputs["pixel_values"], questions)


def test_a_folder_that_is_not_an_export_is_one_clear_error(saved, exported, tmp_path):
    # A PyTorch checkpoint has config.json and the processor, not the manifest or the LM's generation defaults.
    with pytest.raises(MacCapError, match=r"is not a MacCap ONNX export .*: missing onnx_manifest\.json, "
                                          r"language_model/generation_config\.json$"):
        OnnxMacCapCaptioner.from_folder(saved[0])
    with pytest.raises(MacCapError, match="no such folder"):
        OnnxMacCapCaptioner.from_folder(tmp_path / "nothing")
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in exported[0].rglob("*"):
        if path.is_file() and path.name != "lm_decode.onnx":
            target = partial / path.relative_to(exported[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    with pytest.raises(MacCapError) as error:
        check_export_folder(partial)
    message = str(error.value)
    assert "is not a MacCap ONNX export" in message and message.endswith("missing lm_decode.onnx")


def test_each_candidate_prefix_is_prefilled_once_and_shared_by_its_beams(captioner, pixel_values, monkeypatch):
    """As in the PyTorch generate: the [prefix | BOS] but its last position runs once per candidate (lm_prefill), and
    the beams decode from that cache (lm_decode) instead of each running the whole prefix."""
    calls = []
    lm = captioner.language_model
    for name in ("prefill_graph", "decode_graph"):
        graph = getattr(lm, name)
        monkeypatch.setattr(lm, name, lambda _graph=graph, _name=name, **feeds: (
            calls.append((_name, tuple(feeds["inputs_embeds"].shape[:2]))), _graph(**feeds))[1])
    captioner.generate(pixel_values, num_candidates=2)
    queries, beams = captioner.config.num_queries, captioner.generation_config.num_beams
    rows = pixel_values.shape[0] * 2
    assert calls[0] == ("prefill_graph", (rows, queries))
    assert calls[1] == ("decode_graph", (rows * beams, 1))
    assert {name for name, _ in calls[1:]} == {"decode_graph"}


def test_a_llama_lm_with_grouped_query_attention_exports_too(components, tmp_path, pixel_values):
    """Not only GPT-2: a Llama-architecture LM (rotary positions, 2 key/value heads for 4 query heads), the kind
    the demo trains."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_maccap.tools.onnx_export import export_onnx
    from modeling_maccap.tools.tiny import tiny_lm_tokenizer

    tokenizer, lm_dir = tiny_lm_tokenizer(), tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=0, eos_token_id=0, initializer_range=0.5)).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=components[0], lm=str(lm_dir),
                                                                      **TINY_MACCAP).eval()
    manifest = export_onnx(model, tmp_path / "onnx")
    assert max(manifest["max_abs_diff"].values()) <= TOLERANCE
    captioner = OnnxMacCapCaptioner.from_folder(tmp_path / "onnx")
    for kwargs in ({"num_candidates": 3}, {"rerank": False}):
        assert torch.equal(captioner.generate(pixel_values, **kwargs), model.generate(pixel_values, **kwargs))

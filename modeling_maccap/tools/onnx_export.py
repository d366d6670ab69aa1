"""`maccap export-onnx MODEL OUT`: a MacCap checkpoint as ONNX graphs, for deployment with ONNX Runtime.

OUT holds six graphs, float32, with dynamic batch (and sequence) axes:

- `vision.onnx`: pixel_values -> image_embeds (the normalised global embedding g) and subregion_features (the k
  features f_i = g + patch_weight * m_i of `get_subregion_features`, before noise);
- `projector.onnx`: features (batch, k, joint_dim), noise already injected -> prefix_embeds (batch, queries, lm_hidden);
- `lm_embed.onnx`: input_ids -> inputs_embeds (the LM's token embeddings, for the prompt and each decoded token);
- `lm_prefill.onnx`: inputs_embeds, attention_mask, position_ids -> logits of the last position, present.{i}.key /
  present.{i}.value for every LM layer;
- `lm_decode.onnx`: the same inputs plus past.{i}.key / past.{i}.value (the cache so far) -> logits of the last
  position and the presents (past and new positions together);
- `clip_text.onnx`: input_ids, attention_mask -> text_embeds (normalised CLIP text embeddings, for reranking).

The LM graphs take what transformers 5's decoder LMs take (GPT-2, Llama, ...): inputs_embeds, attention_mask,
position_ids, logits_to_keep and a `DynamicCache`, whose layers hold `keys` and `values` (batch, heads, sequence,
head size).

Beside them: config.json, generation_config.json, the processor's files (image processor and both tokenizers),
language_model/generation_config.json (the LM's own generation defaults, which `generate` completes its options
with) and onnx_manifest.json, which names the graphs, their files, inputs and outputs, and the largest difference
from the PyTorch modules measured at export. `tools/onnx_runtime.py` runs `generate()` on that folder.

The graphs come from `torch.onnx.export(..., dynamo=True)` (torch.export, then ONNX Script): it exports every graph
here, including the LM with a transformers `DynamicCache` built from flat past tensors inside the wrapper, and keeps
transformers' attention masks (transformers does not take its shortcuts, such as dropping an all-ones mask, while
torch.export traces). The TorchScript exporter (`dynamo=False`) is deprecated in torch. optimum's exporters are not
used: they export whole Hub architectures (a CLIP, a GPT-2) with their own input conventions, while MacCap's vision
graph (the last layer's attention, top-k subregions and their mixes) and its projector are its own; they would need
custom export configs for both and a dependency that follows transformers releases of its own.

Only the standard library is imported at module level: the CLI imports this module to build its parser.
"""

import json
import shutil
import sys
from pathlib import Path

from .errors import MacCapError, listing

MANIFEST = "onnx_manifest.json"
FORMAT = "maccap-onnx"
FORMAT_VERSION = 1
OPSET = 18
# The generation defaults of the LM itself (GenerationMixin fills the options MacCap's generation config leaves
# unset with them), in a subfolder so they do not replace MacCap's generation_config.json.
LM_GENERATION_DIR = "language_model"
GRAPHS = ("vision", "projector", "lm_embed", "lm_prefill", "lm_decode", "clip_text")
# The largest difference from the PyTorch modules accepted at export (float32).
TOLERANCE = 1e-4


def cache_names(num_layers, kind):
    """The flat names of an LM cache: past.{i}.key, past.{i}.value, ... (kind "past" or "present")."""
    return [f"{kind}.{i}.{part}" for i in range(num_layers) for part in ("key", "value")]


# ---------------------------------------------------------------------------------------------- the wrappers
def _wrappers():
    """The modules that are exported: each one a piece of MacCapForConditionalGeneration with tensor inputs and a
    tuple of tensor outputs. Built here so that torch is imported only when exporting."""
    import torch
    from torch import nn
    from transformers import DynamicCache

    from ..transformers_compat import cache_argument

    class Vision(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model.get_subregion_features(pixel_values)
            return out.image_embeds, out.subregion_features

    class ClipText(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model.get_text_embeds(input_ids, attention_mask)

    class LMStep(nn.Module):
        """One LM forward with a flat cache: the past tensors go into a DynamicCache, the presents come out flat.
        Only the last position's logits are computed (what decoding uses)."""

        def __init__(self, lm):
            super().__init__()
            self.lm, self.cache_name = lm, cache_argument(lm)

        def forward(self, inputs_embeds, attention_mask, position_ids, past=()):
            kwargs = {}
            if past:
                cache = DynamicCache(config=self.lm.config)
                for i in range(len(past) // 2):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                kwargs[self.cache_name] = cache
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, logits_to_keep=1, **kwargs)
            present = getattr(out, self.cache_name)
            return (out.logits, *(t for layer in present.layers for t in (layer.keys, layer.values)))

    return torch, Vision, ClipText, LMStep


def example_inputs(model, batch=2, seed=0):
    """Inputs of every graph at a small size, as (positional args, names) per graph; the LM's past comes from a
    PyTorch prefill so that its shapes are the LM's own (heads, head size)."""
    torch, _, _, LMStep = _wrappers()
    g = torch.Generator().manual_seed(seed)
    config = model.config
    size = config.clip_config.vision_config.image_size
    lm = model.language_model
    hidden = lm.get_input_embeddings().weight.shape[1]
    vocab = lm.get_input_embeddings().weight.shape[0]
    clip_vocab = config.clip_config.text_config.vocab_size
    prefill, decode, past_len = 5, 2, 3
    mask = torch.ones(batch, past_len + decode, dtype=torch.long)
    mask[0, :1] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        past = LMStep(lm).eval()(torch.randn(batch, past_len, hidden, generator=g), mask[:, :past_len],
                                 positions[:, :past_len])[1:]
    clip_ids = torch.randint(2, clip_vocab, (batch, 7), generator=g)
    clip_ids[:, -1] = config.clip_config.text_config.eos_token_id  # CLIP embeds a text at its end token
    clip_mask = torch.ones_like(clip_ids)
    clip_ids[-1, 4], clip_mask[-1, 5:] = config.clip_config.text_config.eos_token_id, 0  # a shorter, padded text
    prefill_mask = torch.ones(batch, prefill, dtype=torch.long)
    prefill_mask[0, :2] = 0
    return {
        "vision": (torch.randn(batch, 3, size, size, generator=g),),
        "projector": (torch.nn.functional.normalize(
            torch.randn(batch, config.num_subregions, config.projector_dim, generator=g), dim=-1),),
        "lm_embed": (torch.randint(0, vocab, (batch, 3), generator=g),),
        "lm_prefill": (torch.randn(batch, prefill, hidden, generator=g), prefill_mask,
                       (prefill_mask.cumsum(-1) - 1).masked_fill(prefill_mask == 0, 0)),
        "lm_decode": (torch.randn(batch, decode, hidden, generator=g), mask, positions[:, past_len:], tuple(past)),
        "clip_text": (clip_ids, clip_mask),
    }


def graph_modules(model, examples):
    """name -> (module, input names, output names, dynamic shapes) for the six graphs; `examples` (example_inputs)
    give the LM's number of cache layers, from the past its PyTorch prefill returned."""
    torch, Vision, ClipText, LMStep = _wrappers()
    dyn = torch.export.Dim.DYNAMIC
    layers = len(examples["lm_decode"][3]) // 2
    present, past = cache_names(layers, "present"), cache_names(layers, "past")
    batch_seq = {0: dyn, 1: dyn}
    lm_inputs = ["inputs_embeds", "attention_mask", "position_ids"]

    class Prefill(LMStep):
        def forward(self, inputs_embeds, attention_mask, position_ids):
            return super().forward(inputs_embeds, attention_mask, position_ids)

    return {
        "vision": (Vision(model), ["pixel_values"], ["image_embeds", "subregion_features"], ({0: dyn},)),
        "projector": (model.projector, ["features"], ["prefix_embeds"], ({0: dyn},)),
        "lm_embed": (model.language_model.get_input_embeddings(), ["input_ids"], ["inputs_embeds"], (batch_seq,)),
        "lm_prefill": (Prefill(model.language_model), lm_inputs, ["logits", *present], (batch_seq,) * 3),
        "lm_decode": (LMStep(model.language_model), lm_inputs + past, ["logits", *present],
                      (batch_seq,) * 3 + (tuple({0: dyn, 2: dyn} for _ in past),)),
        "clip_text": (ClipText(model), ["input_ids", "attention_mask"], ["text_embeds"], (batch_seq,) * 2),
    }


# ------------------------------------------------------------------------------------------------- exporting
def export_onnx(model, out, opset=OPSET, check=True):
    """Write the ONNX export of `model` (a float32 MacCapForConditionalGeneration with its processor attached) into
    the folder `out`; returns the manifest. With `check`, every graph is run with ONNX Runtime on inputs of another
    batch size than the export's and compared with the PyTorch module (the differences go into the manifest; one
    above TOLERANCE is a MacCapError)."""
    import torch
    import transformers

    if model.processor is None:
        raise MacCapError("the model has no processor (image processor and tokenizers): an ONNX export needs one")
    if model.dtype != torch.float32:
        raise MacCapError(f"the ONNX export is float32; the model is in {model.dtype}: load it with dtype=float32")
    if model.config.patch_keys:
        raise MacCapError("the ONNX export has no graph for PCM-Net's patch and concept keys (config.patch_keys): "
                          "caption this model with PyTorch")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    examples = example_inputs(model)
    graphs = {}
    with torch.no_grad():
        for name, (module, inputs, outputs, shapes) in graph_modules(model, examples).items():
            file = f"{name}.onnx"
            torch.onnx.export(module.eval(), examples[name], str(out / file), input_names=inputs,
                              output_names=outputs, dynamic_shapes=shapes, dynamo=True, opset_version=opset,
                              external_data=True, optimize=True, verbose=False)
            graphs[name] = {"file": file, "inputs": inputs, "outputs": outputs}
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    model.language_model.generation_config.save_pretrained(out / LM_GENERATION_DIR)
    model.processor.save_pretrained(out)
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file() and path.name != MANIFEST)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "opset": opset, "dtype": "float32",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "lm_layers": (len(graphs["lm_decode"]["inputs"]) - 3) // 2,
        "lm_logits": "the last position only, (batch, 1, vocab)",
        "graphs": graphs, "files": files,
    }
    if check:
        diffs = compare_graphs(model, out, manifest)
        manifest["max_abs_diff"] = diffs
        bad = {name: diff for name, diff in diffs.items() if not diff <= TOLERANCE}
        if bad:
            raise MacCapError(f"the ONNX graphs differ from the PyTorch model by more than {TOLERANCE:g}: "
                              + ", ".join(f"{name} {diff:.3g}" for name, diff in bad.items()))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _flat(args):
    flat = []
    for arg in args:
        flat.extend(arg if isinstance(arg, (tuple, list)) else [arg])
    return flat


def compare_graphs(model, folder, manifest=None, batch=3, seed=1):
    """The largest absolute difference between each ONNX graph in `folder` (run by ONNX Runtime) and its PyTorch
    module, on inputs of batch size `batch` (the export traced batch 2). The LM's presents are compared at the
    positions the attention mask keeps (a padded position's hidden state is never attended to, and the two
    runtimes fill a fully masked attention row differently)."""
    import numpy as np
    import onnxruntime
    import torch

    manifest = manifest or json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    examples = example_inputs(model, batch=batch, seed=seed)
    diffs = {}
    with torch.no_grad():
        for name, (module, inputs, outputs, _) in graph_modules(model, examples).items():
            args = examples[name]
            expected = module.eval()(*args)
            expected = [expected] if torch.is_tensor(expected) else list(expected)
            session = onnxruntime.InferenceSession(str(Path(folder) / manifest["graphs"][name]["file"]),
                                                   providers=["CPUExecutionProvider"])
            got = session.run(outputs, {n: t.numpy() for n, t in zip(inputs, _flat(args))})
            worst = 0.0
            for out_name, want, have in zip(outputs, expected, got):
                want = want.numpy()
                if want.shape != have.shape:
                    raise MacCapError(f"ONNX graph {name}: output {out_name} has shape {have.shape}, "
                                      f"PyTorch {want.shape}")
                if out_name.startswith("present."):
                    keep = args[1].numpy().astype(bool)  # (batch, total length)
                    want, have = want.transpose(0, 2, 1, 3)[keep], have.transpose(0, 2, 1, 3)[keep]
                worst = max(worst, float(np.abs(want - have).max()))
            diffs[name] = worst
    return diffs


# ---------------------------------------------------------------------------------------------- command line
def add_parser(commands):
    exp = commands.add_parser("export-onnx", help="export a MacCap checkpoint as ONNX graphs for ONNX Runtime")
    exp.add_argument("model", help="a MacCap folder or Hub id (with its processor files)")
    exp.add_argument("out", type=Path, help="the export folder to write")
    exp.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists and is not empty")
    exp.add_argument("--no-check", action="store_true",
                     help="skip running each graph with ONNX Runtime against the PyTorch module")
    exp.set_defaults(run=run)


def run(args):
    out = args.out
    if out.exists() and not out.is_dir():
        raise MacCapError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise MacCapError(f"{out} is not empty: pass --overwrite to replace it")
        shutil.rmtree(out)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        if sys.version_info < (3, 11):
            raise MacCapError("the ONNX export needs onnxruntime 1.32 or newer, which needs Python 3.11 or newer "
                              f"(this is Python {sys.version_info.major}.{sys.version_info.minor})") from None
        raise MacCapError(f"the ONNX export needs onnx, onnxscript and onnxruntime ({error.name} is missing): "
                          "pip install 'maccap[onnx]'") from None
    from .jobs import load_inference_model

    model = load_inference_model(args.model, device="cpu", dtype="float32")
    manifest = export_onnx(model, out, opset=args.opset, check=not args.no_check)
    print(f"wrote {listing(manifest['graphs'][name]['file'] for name in GRAPHS)} and the model's config, "
          f"generation config and processor to {out}")
    for name, diff in manifest.get("max_abs_diff", {}).items():
        print(f"  {name}: largest difference from PyTorch {diff:.2e}")
    return 0

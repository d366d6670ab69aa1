"""Captioning throughput of MacCap's `generate()` at real sizes, against the machine's matmul FLOP floor.

CLIP ViT-B/32 + GPT-2 124M with random weights, built offline, with the paper's MacCap settings (32 queries, k = 10
subregions, beam search with 4 beams and 16 new tokens). For each batch size x number of candidates (1 = plain beam
search, rerank=False; N > 1 = N noisy candidates reranked by CLIP, the default path) a fresh process times
`model.generate` (with its default `max_decode_rows`) and reports images/s, peak RSS and where the time goes
(vision tower, projector, decoding, reranking). The FLOPs per image are counted analytically (and cross-checked
with torch's FlopCounterMode); with the measured matmul rate they give the floor time and the ratio to it. Not a
timed test.

    python benchmarks/generate_throughput.py [--batch-sizes 1 8 32] [--candidates 1 4] [--repeats N] [--threads T]
        [--device cpu|cuda] [--dtypes float32 bfloat16] [--no-baseline] [--onnx] [--out FILE] [--markdown BENCHMARKS.md]

Each configuration runs in every `--dtypes` (the weights' dtype, `from_pretrained(..., dtype=...)`; float32 is the
default and the captions of the Python API, the others are opt-in; what they cost in captions is measured on a
trained model by benchmarks/dtype_agreement.py, since a random LM's nearly flat logits flip at any rounding).
Beside each configuration, unless --no-baseline, a fresh process times the reference code's algorithm on the same
weights and inputs, in float32 as the reference code runs (benchmarks/reference_baseline.py: the same candidates,
done the reference's way), and the report gives them side by side with their ratios. With --onnx (cpu only), the
float32 model is exported once by `maccap export-onnx`'s `export_onnx` (each graph checked against PyTorch), and
beside each configuration a fresh process times `OnnxMacCapCaptioner.generate` (ONNX Runtime's CPU provider) with
the same inputs, options, warm-up and repeats as the package's rows.

Writes the figures and the command to `--out` (JSON) and to this benchmark's section of BENCHMARKS.md.
"""

import argparse
import atexit
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = "--child" in sys.argv
# Before transformers is imported: no hub access, and no trace in the user's caches (children inherit both).
TMP = None if CHILD else Path(tempfile.mkdtemp(prefix="maccap-generate-throughput-"))
if TMP is not None:
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(TMP / "hf_home"))
    atexit.register(shutil.rmtree, TMP, ignore_errors=True)
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from modeling_maccap.modeling_maccap import CPU_DECODE_ROWS, MacCapForConditionalGeneration  # noqa: E402
from modeling_maccap.transformers_compat import CACHE_ARGUMENTS  # noqa: E402

from components import LM_TOKENIZER_NOTE, build_components, publish, run_facts, synthetic_captions  # noqa: E402
from reference_baseline import reference_generate  # noqa: E402

PARTS = ("vision", "projector", "decoding", "reranking")
REFERENCE_DTYPE = "float32"  # the reference code's weights, as it runs them
FORCED_NOTE = ("EOS suppressed until the 16th new token (min_new_tokens = max_new_tokens): every beam decodes the "
               "full 16 tokens, whatever the random LM prefers")
VOCAB_NOTE = ("decoding restricted to the stand-in tokenizer's whole-word tokens (a logits mask; the LM head still "
              "computes all 50257 logits), so that candidates decode to 16 words, about 18 CLIP tokens, as real "
              "captions of 16 GPT-2 tokens would")


def dtype_of(name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ machine rate
def matmul_gflops(m, k, n, device, dtype, repeats=7):
    """Median rate of one (m x k) @ (k x n) product, 2*m*k*n FLOPs."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    warm = time.perf_counter()
    while time.perf_counter() - warm < 0.3:  # the first products, and a clock still ramping up, run slower
        torch.mm(a, b, out=c)
        sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------- FLOPs per image
def matrices(module):
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


def analytic_flops(model, candidates, clip_tokens, prompt_tokens=1):
    """FLOPs (2 x multiply-adds of every matmul) per image of `generate` with `candidates` draws, as executed
    (since 1f7675e): the [prefix | prompt] but its last position runs once per candidate through the LM's base model
    (no LM head) and its KV cache is repeated for the beams; the LM's beam search then runs, per beam, the last
    position against it and one token per step, each with the LM head. `decoding_shared_prefix` runs the whole
    [prefix | prompt] and its logits once per candidate (the beams all start from them), the least the method
    needs; `decoding_prefix_per_beam` is the decoding before 1f7675e, when transformers' beam search copied the
    prefix into every beam before the first forward."""
    config, gen = model.config, model.generation_config
    vision, vc = model.clip.vision_model, model.clip.config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    t, d = patches + 1, vc.hidden_size
    attn = vision.encoder.layers[-1].self_attn
    joint = config.projector_dim
    flops = {"vision": 2 * matrices(vision.encoder) * t + 2 * vision.embeddings.patch_embedding.weight.numel() * patches
             + 4 * vc.num_hidden_layers * t * t * d
             # get_subregion_features: q, k of the last layer again, its attention scores, projection, the k mixes
             + 2 * (attn.q_proj.weight.numel() + attn.k_proj.weight.numel()) * t + 2 * t * t * d
             + 2 * model.clip.visual_projection.weight.numel() * t + 2 * config.num_subregions * t * joint}

    q, k, f = config.num_queries, config.num_subregions, config.aligner_ffn_dim
    self_attention = 2 * 4 * joint * joint * q + 4 * q * q * joint  # q, k, v, out projections; scores
    layer = (self_attention + 2 * 2 * joint * joint * q + 2 * 2 * joint * joint * k + 4 * q * k * joint  # cross
             + 2 * 2 * joint * f * q)  # feed-forward
    projector = config.aligner_layers * layer + 2 * q * sum(linear.weight.numel() for linear in model.projector.mlp)
    flops["projector"] = candidates * projector
    flops["projector_self_attention"] = candidates * config.aligner_layers * self_attention

    lm = model.language_model.config
    beams, new = gen.num_beams, gen.max_new_tokens
    p = q + prompt_tokens
    body = 2 * matrices(model.language_model.transformer.h)  # GPT-2's blocks; the LM head is the tied embedding
    att, head = 4 * lm.n_layer * lm.n_embd, 2 * lm.n_embd * lm.vocab_size
    context = sum(p + j for j in range(1, new))  # keys attended by the steps after the first
    steps = body * (new - 1) + att * context + head * (new - 1)  # per beam, after the first new token
    prefill = body * (p - 1) + att * (p - 1) ** 2  # once per candidate; the last position (p keys) once per beam
    flops["decoding"] = candidates * (prefill + beams * (body + att * p + head + steps))
    flops["decoding_shared_prefix"] = candidates * (body * p + att * p * p + head + beams * steps)
    flops["decoding_prefix_per_beam"] = candidates * beams * (body * p + att * p * p + head + steps)

    tc = model.clip.config.text_config
    text = (2 * matrices(model.clip.text_model.encoder) * clip_tokens + 4 * tc.num_hidden_layers * clip_tokens ** 2
            * tc.hidden_size + 2 * model.clip.text_projection.weight.numel())
    flops["reranking"] = candidates * text if candidates > 1 else 0
    flops["total"] = sum(flops[part] for part in PARTS)
    for name in ("shared_prefix", "prefix_per_beam"):
        flops[f"total_{name}"] = flops["total"] - flops["decoding"] + flops[f"decoding_{name}"]
    return flops


# ------------------------------------------------------------------------------------------------- the child runs
class WordVocabulary(LogitsProcessor):
    """Masks every id that is not a whole word of the stand-in tokenizer (see VOCAB_NOTE); its time is recorded."""

    def __init__(self, tokenizer, vocab_size, device):
        words = [i for i in range(len(tokenizer)) if re.fullmatch(r" [a-z]+", tokenizer.decode([i]))]
        self.banned = torch.ones(vocab_size, dtype=torch.bool, device=device)
        self.banned[words] = False
        self.seconds = 0.0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        scores = scores.masked_fill_(self.banned, -float("inf"))
        self.seconds += time.perf_counter() - start
        return scores


class Split:
    """Wall time (and optionally FLOPs) spent inside the wrapped methods, per part, without touching the package."""

    def __init__(self, device, counter=None):
        self.device, self.counter = device, counter
        self.reset()

    def reset(self):
        self.seconds, self.flops = dict.fromkeys((*PARTS, "lm_forward"), 0.0), dict.fromkeys(PARTS, 0)
        self.clip_tokens, self.lm_generate_rows, self.lm_generate_cached = [], [], []

    def wrap(self, owner, name, part):
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            sync(self.device)
            start, flops = time.perf_counter(), self.counter.get_total_flops() if self.counter else 0
            try:
                return method(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[part] += time.perf_counter() - start
                if self.counter:
                    self.flops[part] += self.counter.get_total_flops() - flops

        setattr(owner, name, timed)  # an instance attribute shadows the class's method

    def instrument(self, model):
        self.wrap(model, "get_subregion_features", "vision")
        self.wrap(model, "_image_generators", "projector")  # the per-image noise generators (pixel hashes)
        self.wrap(model, "_prefix_from_features", "projector")
        # The [prefix | prompt] prefill through the LM's base model and the LM's generate calls (decoding chunks).
        self.wrap(model, "_decode", "decoding")
        self.wrap(model.processor, "batch_decode", "reranking")
        self.wrap(model, "score_captions", "reranking")
        clip_text_inputs = model.processor.clip_text_inputs

        def recorded(texts):
            tokens = clip_text_inputs(texts)
            self.clip_tokens.append(tokens["input_ids"].shape[1])
            return tokens

        model.processor.clip_text_inputs = recorded
        lm_generate = model.language_model.generate

        def counted(*args, **kwargs):
            self.lm_generate_rows.append(kwargs["inputs_embeds"].shape[0])
            # generate() hands the LM the prefix cache it prefilled (the shared prefill) under the LM's cache name.
            self.lm_generate_cached.append(any(name in kwargs for name in CACHE_ARGUMENTS))
            return lm_generate(*args, **kwargs)

        model.language_model.generate = counted
        # Every LM forward: the prefill through the base model, and the LM's (with its head) inside the beam search
        # (the rest of `decoding` is the search itself). The base model also runs inside the LM's: outermost only.
        starts = []

        def forward_start(*_):
            sync(self.device)
            starts.append(time.perf_counter())

        def forward_end(*_):
            sync(self.device)
            start = starts.pop()
            if not starts:
                self.seconds["lm_forward"] += time.perf_counter() - start

        # (The ONNX Runtime LM is its own base model: hooked once.)
        for module in {id(m): m for m in (model.language_model, model.language_model.base_model)}.values():
            module.register_forward_pre_hook(forward_start)
            module.register_forward_hook(forward_end)


def rss_kib(field):
    return int(re.search(rf"{field}:\s*(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def load_model(spec):
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtype = dtype_of(spec["dtype"])
    model = MacCapForConditionalGeneration.from_pretrained_components(clip=spec["clip"], lm=spec["lm"], dtype=dtype)
    return model.to(spec["device"]).eval().requires_grad_(False)


def load_onnx_captioner(spec):
    """The ONNX Runtime captioner on the export folder, with --threads for ONNX Runtime's intra-op pool too."""
    import onnxruntime

    from modeling_maccap.tools.onnx_runtime import OnnxMacCapCaptioner

    transformers.logging.set_verbosity_error()
    options = onnxruntime.SessionOptions()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
        options.intra_op_num_threads, options.inter_op_num_threads = spec["threads"], 1
    return OnnxMacCapCaptioner.from_folder(spec["onnx_folder"], session_options=options)


def child_export(spec):
    """The float32 model exported to ONNX (`export_onnx`, every graph checked against PyTorch)."""
    from modeling_maccap.tools.onnx_export import export_onnx

    start = time.perf_counter()
    manifest = export_onnx(load_model(spec), spec["folder"])
    return {"max_abs_diff": manifest["max_abs_diff"], "export_s": time.perf_counter() - start}


def random_inputs(model, batch, seed=0):
    """Random RGB images of varied sizes, preprocessed once (not timed)."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (int(rng.integers(200, 480)), int(rng.integers(200, 480)), 3), dtype=np.uint8)
              for _ in range(batch)]
    return model.processor(images=images)


def generate_kwargs(model, candidates, vocabulary):
    new = model.generation_config.max_new_tokens
    return dict(num_candidates=candidates, rerank=candidates > 1, min_new_tokens=new,
                logits_processor=LogitsProcessorList([vocabulary]))


def child_run(spec):
    """One configuration, timed: warm-up, then `repeats` calls; peak RSS of this process. `spec["impl"]`: "package"
    (`model.generate`), "reference" (the reference code's algorithm, benchmarks/reference_baseline.py) or "onnx"
    (`OnnxMacCapCaptioner.generate` on the export; its FLOPs are the package's, counted by the parent)."""
    device = spec["device"]
    model = load_onnx_captioner(spec) if spec["impl"] == "onnx" else load_model(spec)
    inputs = random_inputs(model, spec["batch"])
    vocabulary = WordVocabulary(model.processor.tokenizer, model.language_model.config.vocab_size, device)
    kwargs = generate_kwargs(model, spec["candidates"], vocabulary)
    split = Split(device)
    split.instrument(model)
    rss_loaded, load_peak = rss_kib("VmRSS"), rss_kib("VmHWM")
    peak_reset = reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    calls = []
    with torch.no_grad():
        for i in range(spec["warmup"] + spec["repeats"]):
            split.reset()
            vocabulary.seconds = 0.0
            sync(device)
            start = time.perf_counter()
            if spec["impl"] == "reference":
                out = reference_generate(model, inputs["pixel_values"], spec["candidates"],
                                         min_new_tokens=kwargs["min_new_tokens"],
                                         logits_processor=kwargs["logits_processor"])[0]
            else:
                out = model.generate(**inputs, **kwargs)
            sync(device)
            total = time.perf_counter() - start
            new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
            assert new_tokens == model.generation_config.max_new_tokens, f"decoded {new_tokens} new tokens"
            if i >= spec["warmup"]:
                calls.append({"total_s": total, **{f"{k}_s": v for k, v in split.seconds.items()},
                              "word_mask_s": vocabulary.seconds, "clip_tokens": list(split.clip_tokens),
                              "lm_generate_rows": list(split.lm_generate_rows),
                              "lm_generate_cached": list(split.lm_generate_cached)})
    generation_peak = rss_kib("VmHWM")
    clip_tokens = [t for c in calls for t in c["clip_tokens"]]
    flops = (None if spec["impl"] == "onnx" else
             analytic_flops(model, spec["candidates"], statistics.mean(clip_tokens) if clip_tokens else 0))
    return {"calls": calls, "flops": flops, "rss_loaded_mb": rss_loaded / 1024,
            "peak_rss_mb": max(load_peak, generation_peak) / 1024 if peak_reset else generation_peak / 1024,
            "generation_peak_rss_mb": generation_peak / 1024 if peak_reset else None,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def child_count(spec):
    """FLOPs per part counted by torch's FlopCounterMode on one image, for each number of candidates."""
    model = load_model(spec)
    inputs = random_inputs(model, 1)
    vocabulary = WordVocabulary(model.processor.tokenizer, model.language_model.config.vocab_size, spec["device"])
    counter = FlopCounterMode(display=False)
    split = Split(spec["device"], counter)
    split.instrument(model)
    counts = {}
    with torch.no_grad():
        for n in spec["candidates_list"]:
            split.reset()
            with counter:
                model.generate(**inputs, **generate_kwargs(model, n, vocabulary))
            counts[n] = {**split.flops, "total": counter.get_total_flops(),
                         "clip_tokens": split.clip_tokens[0] if split.clip_tokens else 0}
            counts[n]["analytic"] = analytic_flops(model, n, counts[n]["clip_tokens"])
    config, gen = model.config, model.generation_config
    lm = model.language_model.config
    settings = {"num_queries": config.num_queries, "num_subregions": config.num_subregions,
                "num_beams": gen.num_beams, "max_new_tokens": gen.max_new_tokens, "lm_hidden": lm.n_embd,
                "lm_ffn": lm.n_inner or 4 * lm.n_embd, "vocab_size": lm.vocab_size,
                "max_decode_rows": default_decode_rows(spec["device"])}
    return {"counts": counts, "settings": settings}


def shared_prefill_note(configs, settings):
    """Whether generate() shared each candidate's [prefix | prompt] prefill with its beams in every LM call."""
    cached = [flag for c in configs for flag in c["lm_generate_cached"]]
    if settings["num_beams"] > 1 and cached and all(cached):
        return "Shared prefill: on in every LM `generate` call (the prefix cache is handed to the beam search)."
    return (f"Shared prefill: **off** in {cached.count(False)} of {len(cached)} LM `generate` calls (every beam runs "
            "the whole [prefix | prompt]; the FLOP counts below assume it on).")


def default_decode_rows(device):
    """generate()'s `max_decode_rows` when not given, for this benchmark's beam search (no sampling); None: no limit."""
    return CPU_DECODE_ROWS if device == "cpu" else None


def step_rows(batch, candidates, settings):
    """LM rows of one decoding step: candidates x beams, at most `max_decode_rows` per LM call (generate's split)."""
    beams, limit, rows = settings["num_beams"], settings["max_decode_rows"], batch * candidates
    return beams * (rows if limit is None else min(rows, max(1, limit // beams)))


def spawn(spec):
    out = TMP / f"child-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--child", json.dumps({**spec, "out": str(out)})]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child run failed ({spec}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------ report
def summarise(run, batch, candidates, flops, rate):
    calls = run.pop("calls")
    median = statistics.median(c["total_s"] for c in calls)
    parts = {part: statistics.median(c[f"{part}_s"] for c in calls) for part in (*PARTS, "lm_forward")}
    parts["other"] = median - sum(parts[p] for p in PARTS)
    clip_tokens = [t for c in calls for t in c["clip_tokens"]]
    floor = batch * flops["total"] / (rate * 1e9)
    floor_shared = batch * flops["total_shared_prefix"] / (rate * 1e9)
    return {"batch": batch, "candidates": candidates, "median_s": median, "images_per_s": batch / median,
            "times_s": [round(c["total_s"], 3) for c in calls], "split_s": parts,
            "word_mask_s": statistics.median(c["word_mask_s"] for c in calls),
            "clip_tokens_padded": statistics.mean(clip_tokens) if clip_tokens else None,
            "lm_generate_rows": calls[0]["lm_generate_rows"],
            "lm_generate_cached": [flag for c in calls for flag in c["lm_generate_cached"]],
            "gflop_per_image": flops["total"] / 1e9, "floor_s": floor, "ratio_to_floor": median / floor,
            "gflop_per_image_shared_prefix": flops["total_shared_prefix"] / 1e9,
            "ratio_to_floor_shared_prefix": median / floor_shared, **run}


def report(r):
    """The figures as markdown: printed, and this benchmark's section of BENCHMARKS.md."""
    f, s = r["figures"], r["settings"]
    rates = f["matmul_gflops"]
    counts = sorted({len(c["times_s"]) for c in f["configs"]})
    timed = " or ".join(map(str, counts))
    where = r["machine"] if r["gpu"] is None else f"{r['gpu']} (host: {r['machine']})"
    lines = [
        "## Captioning throughput: `generate()` images/s against the FLOP floor",
        "",
        f"CLIP ViT-B/32 + GPT-2 124M (random weights, the paper's MacCap settings: {s['num_queries']} queries, "
        f"k = {s['num_subregions']}, beam search with {s['num_beams']} beams, {s['max_new_tokens']} new tokens, "
        f"BOS prompt), `model.generate` on {r['device']}, weights in {' and '.join(r['dtypes'])} (`from_pretrained("
        f"..., dtype=...)`; float32 is the default, the others opt-in), {where}, {r['threads']} threads, "
        f"1-min load average {r['load_average_1min'][0]:.1f} -> {r['load_average_1min'][1]:.1f}, {r['date'][:10]}, "
        f"torch {r['torch']}, transformers {r['transformers']}. {shared_prefill_note(f['configs'], s)} "
        f"1 candidate = `rerank=False` (plain beam search); N > 1 = N noisy candidates decoded together and "
        f"reranked by CLIP (the default path). {decode_calls(f['configs'], s)} {FORCED_NOTE}; {VOCAB_NOTE}. "
        f"LM tokenizer: {LM_TOKENIZER_NOTE}. "
        f"Random images of varied sizes, preprocessed once (not timed). Each row is a fresh process: "
        f"{s['warmup']} warm-up call{'s' if s['warmup'] > 1 else ''}, then the median of {timed} timed calls; "
        f"peak RSS = the process's VmHWM (model loading included){'; GPU = peak allocated' if r['gpu'] else ''}. "
        "Decoding = `generate`'s `_decode`: the [prefix | prompt] prefill through GPT-2's base model and the LM's "
        "beam search; in brackets the time in LM forwards (the prefill's and the beam search's).",
        "",
        f"Machine matmul rate (median `torch.mm`, {s['matmul_size']}^3, same threads): "
        + "; ".join(f"{d} **{rates[d]:.0f} GFLOP/s** (before {f['matmul_gflops_before'][d]:.0f}, after "
                    f"{f['matmul_gflops_after'][d]:.0f})" for d in r["dtypes"])
        + ". The higher of before and after is the floor's rate. Floor = GFLOP per image x batch / the rate of "
        "the row's dtype.",
        "",
        f"| batch | candidates | dtype | s / call | images/s | peak RSS{' / GPU' if r['gpu'] else ''} (MB) "
        "| GFLOP / image | floor (s) | x floor | vision | projector | decoding (LM forward) | reranking | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in f["configs"]:
        sp, m = c["split_s"], c["median_s"]
        pct = {k: 100 * v / m for k, v in sp.items()}
        memory = f"{c['peak_rss_mb']:.0f}" + (f" / {c['gpu_peak_mb']:.0f}" if c["gpu_peak_mb"] is not None else "")
        lines.append(
            f"| {c['batch']} | {c['candidates']} | {c['dtype']} | {m:.2f} | {c['images_per_s']:.2f} | {memory} | "
            f"{c['gflop_per_image']:.1f} | {c['floor_s']:.2f} | **{c['ratio_to_floor']:.2f}x** | "
            f"{pct['vision']:.1f}% | {pct['projector']:.1f}% | {pct['decoding']:.1f}% ({pct['lm_forward']:.1f}%) | "
            f"{pct['reranking']:.1f}% | {pct['other']:.1f}% |")
    if f.get("baseline"):
        lines += ["", "Side by side with the reference code's algorithm (`benchmarks/reference_baseline.py`: a vision "
                  "pass per candidate, each candidate its own LM `generate` in which every beam runs the whole "
                  f"[prefix | BOS], CLIP texts padded to 77 tokens and scored one image at a time; the same weights, "
                  f"inputs and candidates; weights in {r['reference_dtype']}, as the reference code runs them), "
                  "each row a fresh process, alternating with the package's:", "",
                  f"| batch | candidates | reference ({r['reference_dtype']}) s / call | reference images/s "
                  "| package dtype | package images/s | package / reference | peak RSS reference / package (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in f["baseline"]:
            lines.append(f"| {b['batch']} | {b['candidates']} | {b['reference_median_s']:.2f} | "
                         f"{b['reference_images_per_s']:.2f} | {b['dtype']} | {b['package_images_per_s']:.2f} | "
                         f"**{b['speedup']:.2f}x** | {b['reference_peak_rss_mb']:.0f} / {b['package_peak_rss_mb']:.0f} |")
    if f.get("onnx"):
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in f["onnx_max_abs_diff"].items())
        lines += ["", "ONNX Runtime (`--onnx`): the float32 model exported by `maccap export-onnx` (largest difference "
                  f"from PyTorch per graph at export: {diffs}), `OnnxMacCapCaptioner.generate` on ONNX Runtime's CPU "
                  "provider (intra-op threads = --threads) with the package's control flow and transformers' beam "
                  "search, same inputs, options, warm-up and repeats, each row a fresh process beside the package's; "
                  "FLOPs and floor as the package's row:", "",
                  "| batch | candidates | s / call | images/s | peak RSS (MB) | x floor | package images/s "
                  "| ONNX / package | vision | projector | decoding (LM forward) | reranking | other |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in f["onnx"]:
            sp, m = c["split_s"], c["median_s"]
            pct = {k: 100 * v / m for k, v in sp.items()}
            lines.append(
                f"| {c['batch']} | {c['candidates']} | {m:.2f} | {c['images_per_s']:.2f} | {c['peak_rss_mb']:.0f} | "
                f"{c['ratio_to_floor']:.2f}x | {c['package_images_per_s']:.2f} | **{c['onnx_vs_package']:.2f}x** | "
                f"{pct['vision']:.1f}% | {pct['projector']:.1f}% | {pct['decoding']:.1f}% ({pct['lm_forward']:.1f}%) | "
                f"{pct['reranking']:.1f}% | {pct['other']:.1f}% |")
    lines += ["", "FLOPs per image (analytic; FlopCounterMode on one image in brackets):", "",
              "| candidates | vision | projector | decoding | reranking | total | decoding, least "
              "| decoding before 1f7675e |",
              "|---|---|---|---|---|---|---|---|"]
    for n, count in f["flop_counts"].items():
        a = count["analytic"]
        cell = lambda part: f"{a[part] / 1e9:.2f} [{count[part] / 1e9:.2f}]"  # noqa: E731
        lines.append(f"| {n} | {cell('vision')} | {cell('projector')} | {cell('decoding')} | {cell('reranking')} | "
                     f"{a['total'] / 1e9:.2f} [{count['total'] / 1e9:.2f}] | {a['decoding_shared_prefix'] / 1e9:.2f} "
                     f"| {a['decoding_prefix_per_beam'] / 1e9:.2f} |")
    lines += [""] + [f"- {note}" for note in f["notes"]] + ["", f"Command: `{r['command']}`"]
    return "\n".join(lines)


def decode_calls(configs, settings):
    """How `generate` split the candidate rows into LM `generate` calls, as the timed runs recorded it."""
    limit, beams = settings["max_decode_rows"], settings["num_beams"]
    text = (f"`max_decode_rows` = {limit} (generate's default on CPU): LM `generate` calls of at most {limit} LM "
            f"rows (candidate rows x {beams} beams)" if limit else
            "`max_decode_rows` = None (generate's default off CPU): one LM `generate` call")
    split = list({(c["batch"], c["candidates"]): c for c in configs if len(c["lm_generate_rows"]) > 1}.values())
    where = "; ".join(f"batch {c['batch']} x {c['candidates']} candidate(s): {len(c['lm_generate_rows'])} calls of "
                      f"{' + '.join(map(str, c['lm_generate_rows']))} candidate rows" for c in split)
    return f"{text}; {where}, one call in the other rows." if split else f"{text}; one call in every row."


def flop_notes(flop_counts, settings):
    n = max(flop_counts)
    c, a = flop_counts[n], flop_counts[n]["analytic"]
    agree = [part for part in PARTS if abs(c[part] - a[part]) <= 0.001 * a[part]]
    notes = [f"FlopCounterMode on one image with {n} candidate(s) agrees with the analytic count within 0.1% on "
             f"{', '.join(agree)}."] if agree else []
    for part in sorted(set(PARTS) - set(agree)):
        notes.append(f"FlopCounterMode counts {(a[part] - c[part]) / 1e9:.3f} GFLOP "
                     f"({(a[part] - c[part]) / a[part]:.1%}) less than the analytic count on the {part} "
                     f"({n} candidate(s)).")
        if part == "projector":
            notes[-1] += (f" That is the aligner's self-attention ({a['projector_self_attention'] / 1e9:.3f} GFLOP "
                          "analytic): in eval mode without grad, nn.MultiheadAttention runs it as one fused kernel "
                          "(aten._native_multi_head_attention), for which the counter has no formula.")
    decode, least, before = (a[f"decoding{name}"] / n for name in ("", "_shared_prefix", "_prefix_per_beam"))
    prefix, beams = settings["num_queries"] + 1, settings["num_beams"]
    notes.append(
        f"Decoding as executed (since 1f7675e): `generate` runs the first {prefix - 1} of the {prefix} prefix + BOS "
        f"positions once per candidate through GPT-2's base model and repeats their KV cache for the {beams} beams; "
        f"the LM's beam search then runs the last position and the following steps per beam: {decode / 1e9:.1f} "
        f"GFLOP per candidate (counted under decoding, prefill included). Least ('decoding, least'): "
        f"{least / 1e9:.1f}, with the last position and its logits also once per candidate (the beams all start "
        f"from them). Before 1f7675e transformers' beam search copied the inputs into the {beams} beams before the "
        f"first forward, so the {prefix} positions ran once per beam: {before / 1e9:.1f}. GFLOP / image with {n} "
        f"candidate(s): {a['total'] / 1e9:.1f} as executed, {a['total_shared_prefix'] / 1e9:.1f} least, "
        f"{a['total_prefix_per_beam'] / 1e9:.1f} before 1f7675e.")
    return notes


# Issue 19's ceiling on the time per call at the largest batch, as a multiple of the FLOP floor at the dtype's rate.
FLOOR_TARGET = 2.0


def targets(configs, flop_counts):
    notes, verdicts = [], {}
    big = max(c["batch"] for c in configs)
    for c in configs:
        if c["batch"] == big and big >= 32:
            ok = c["ratio_to_floor"] <= FLOOR_TARGET
            verdicts[f"floor_batch{big}_candidates{c['candidates']}_{c['dtype']}"] = ok
            notes.append(
                f"Target: batch {big}, {c['candidates']} candidate(s), {c['dtype']}, within {FLOOR_TARGET:g}x of the "
                f"FLOP floor at the {c['dtype']} matmul rate: {c['ratio_to_floor']:.2f}x, "
                f"**{'met' if ok else 'not met'}**"
                + ("" if ok else f" (by {c['ratio_to_floor'] / FLOOR_TARGET:.2f}x; decoding takes "
                   f"{100 * c['split_s']['decoding'] / c['median_s']:.0f}% of the time, the LM forward "
                   f"{100 * c['split_s']['lm_forward'] / c['median_s']:.0f}%)")
                + f"; against the floor of the least decoding (see the FLOP notes): "
                f"{c['ratio_to_floor_shared_prefix']:.2f}x.")
    by = {(c["batch"], c["candidates"], c["dtype"]): c for c in configs}
    for batch, _, dtype in sorted((k for k in by if k[1] == 1), key=lambda k: (k[0], k[2] != "float32")):
        for n in sorted(c for b, c, d in by if b == batch and d == dtype and c > 1):
            ratio = by[batch, n, dtype]["median_s"] / by[batch, 1, dtype]["median_s"]
            ok = ratio <= 2
            verdicts[f"candidates{n}_vs_1_batch{batch}_{dtype}"] = ok
            fl, fl_least, fl_before = (flop_counts[n]["analytic"][total] / flop_counts[1]["analytic"][total]
                                       for total in ("total", "total_shared_prefix", "total_prefix_per_beam"))
            notes.append(
                f"Target: batch {batch}, {dtype}, {n} reranked candidates cost at most 2x one candidate: "
                f"{ratio:.2f}x, **{'met' if ok else 'not met'}**" + ("" if ok else f" (by {ratio / 2:.2f}x)")
                + f"; the FLOP ratio is {fl:.2f}x as executed, the prefix shared by the beams ({fl_least:.2f}x "
                f"least; {fl_before:.2f}x before 1f7675e)"
                + (": every candidate has its own prefix (its own noise) and its own beam search, so at equal "
                   "matmul efficiency no implementation gets under 2x; one candidate is cheaper per FLOP only where "
                   "its matmuls are too small to fill the machine (small batches)."
                   if min(fl, fl_least) > 2 and not ok else "."))
    return notes, verdicts


def side_by_side(run, package):
    """One configuration's reference-algorithm timing (float32) beside the package's in one dtype."""
    median = statistics.median(c["total_s"] for c in run["calls"])
    return {"batch": package["batch"], "candidates": package["candidates"], "dtype": package["dtype"],
            "reference_dtype": REFERENCE_DTYPE, "reference_median_s": median,

            "reference_images_per_s": package["batch"] / median,
            "reference_times_s": [round(c["total_s"], 3) for c in run["calls"]],
            "reference_peak_rss_mb": run["peak_rss_mb"], "package_images_per_s": package["images_per_s"],
            "package_peak_rss_mb": package["peak_rss_mb"], "speedup": median / package["median_s"]}


# The speed the package owes the reference's algorithm at batch 32 on CPU: images/s ratio by number of candidates.
BASELINE_TARGETS = {1: 2.0, 4: 4.0}


def baseline_targets(baseline, verdicts):
    """The targets against the reference's algorithm (batch 32): speed by candidates, and peak RSS no higher."""
    notes = []
    for b in baseline:
        if b["batch"] != 32 or b["candidates"] not in BASELINE_TARGETS:
            continue
        want = BASELINE_TARGETS[b["candidates"]]
        fast, lean = b["speedup"] >= want, b["package_peak_rss_mb"] <= b["reference_peak_rss_mb"]
        key = f"batch32_candidates{b['candidates']}_{b['dtype']}"
        verdicts[f"baseline_speedup_{key}"], verdicts[f"baseline_peak_rss_{key}"] = fast, lean
        notes.append(f"Target: batch 32, {b['candidates']} candidate(s), package in {b['dtype']}, at least {want:g}x "
                     f"the reference's images/s ({b['reference_dtype']}): {b['speedup']:.2f}x, "
                     f"**{'met' if fast else 'not met'}**"
                     + ("" if fast else f" (short by {want / b['speedup']:.2f}x)")
                     + f"; peak RSS {b['package_peak_rss_mb']:.0f} MB against {b['reference_peak_rss_mb']:.0f} MB, "
                     f"**{'met' if lean else 'not met'}**"
                     + ("." if b["dtype"] == "float32" else "; opt-in, its captions' agreement with float32's: "
                        "benchmarks/dtype_agreement.py."))
    return notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 4],
                        help="1 = plain beam search (rerank=False); N > 1 = N reranked candidates")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per configuration after the warm-up (default: 3, or 2 from batch 32)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first, same shapes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                        help="the package's weights' dtypes (default: float32); float32 always runs when another "
                             "does, as the captions the others are compared with")
    parser.add_argument("--no-baseline", action="store_true",
                        help="time the package alone, not also the reference's algorithm (reference_baseline.py)")
    parser.add_argument("--onnx", action="store_true",
                        help="also time the ONNX Runtime captioner (maccap export-onnx) on the float32 export (cpu)")
    parser.add_argument("--matmul-size", type=int, default=None, help="square matmul for the rate (2048; cuda 8192)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generate_throughput.json")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="'' to leave it alone")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: write the report of the results already in --out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report_only:
        result = json.loads(args.out.read_text(encoding="utf-8"))
        publish(result, report(result), args.out, args.markdown)
        return
    if args.child:
        spec = json.loads(args.child)
        result = {"count": child_count, "export": child_export, "run": child_run}[spec["kind"]](spec)
        Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs a CUDA GPU, and torch.cuda.is_available() is False here "
                     f"(torch {torch.__version__})")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error("--device must be cpu or cuda[:i]")
    if args.onnx and args.device != "cpu":
        parser.error("--onnx times ONNX Runtime's CPU provider: use it with --device cpu")
    if min(args.batch_sizes) < 1 or min(args.candidates) < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("batch sizes, candidates and repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    dtypes = list(dict.fromkeys(["float32", *args.dtypes]))
    matmul_size = args.matmul_size or (8192 if args.device.startswith("cuda") else 2048)
    candidates = sorted(set(args.candidates))

    clip_dir, lm_dir = build_components(TMP, synthetic_captions(2048))
    base = {"clip": clip_dir, "lm": lm_dir, "device": args.device, "threads": args.threads}
    rates_before = {d: matmul_gflops(matmul_size, matmul_size, matmul_size, args.device, dtype_of(d)) for d in dtypes}
    for d, rate in rates_before.items():
        print(f"matmul {matmul_size}^3 {d} on {args.device}: {rate:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    counted = spawn({**base, "dtype": "float32", "kind": "count", "candidates_list": sorted({1, *candidates})})
    flop_counts = {int(n): c for n, c in counted["counts"].items()}
    for n, c in flop_counts.items():
        print(f"{n} candidate(s): {c['analytic']['total'] / 1e9:.1f} GFLOP / image analytic, "
              f"{c['total'] / 1e9:.1f} counted by FlopCounterMode")
    settings = counted["settings"]
    # The rate at one decoding step's shapes (LM rows of one LM call): GPT-2's MLP and LM head.
    step_rates, hidden = {d: {} for d in dtypes}, settings["lm_hidden"]
    for d in dtypes:
        for rows in sorted({step_rows(b, n, settings) for b in args.batch_sizes for n in candidates}):
            step_rates[d][rows] = {
                "mlp": matmul_gflops(rows, hidden, settings["lm_ffn"], args.device, dtype_of(d)),
                "lm_head": matmul_gflops(rows, hidden, settings["vocab_size"], args.device, dtype_of(d))}
    runs, baseline_runs, onnx_runs, onnx_export = [], [], [], None
    impls = [("package", d) for d in dtypes] + ([] if args.no_baseline else [("reference", REFERENCE_DTYPE)])
    if args.onnx:
        base["onnx_folder"] = str(TMP / "onnx")
        onnx_export = spawn({**base, "kind": "export", "dtype": "float32", "folder": base["onnx_folder"]})
        print(f"ONNX export in {onnx_export['export_s']:.0f} s, largest difference from PyTorch per graph: "
              + ", ".join(f"{k} {v:.1e}" for k, v in onnx_export["max_abs_diff"].items()))
        impls.append(("onnx", "float32"))
    for batch in args.batch_sizes:
        for n in candidates:
            repeats = args.repeats or (2 if batch >= 32 else 3)
            for impl, d in impls:  # alternating, same machine
                run = spawn({**base, "kind": "run", "impl": impl, "dtype": d, "batch": batch, "candidates": n,
                             "repeats": repeats, "warmup": args.warmup})
                {"package": runs, "reference": baseline_runs, "onnx": onnx_runs}[impl].append((batch, n, d, run))
                times = [c["total_s"] for c in run["calls"]]
                print(f"{impl:>9} {d:>8}: batch {batch:>3}, {n} candidate(s): {statistics.median(times):.2f} s / call "
                      f"({', '.join(f'{t:.2f}' for t in times)}), peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    rates_after = {d: matmul_gflops(matmul_size, matmul_size, matmul_size, args.device, dtype_of(d)) for d in dtypes}

    rates = {d: max(rates_before[d], rates_after[d]) for d in dtypes}
    configs = [{"dtype": d, **summarise(run, batch, n, run.pop("flops"), rates[d])} for batch, n, d, run in runs]
    notes, verdicts = targets(configs, flop_counts)
    by_config = {(c["batch"], c["candidates"], c["dtype"]): c for c in configs}
    baseline = [side_by_side(run, by_config[batch, n, d]) for batch, n, _, run in baseline_runs for d in dtypes]
    onnx_rows = [{"dtype": d, **summarise(run, batch, n, flop_counts[n]["analytic"], rates[d]),
                  "package_images_per_s": by_config[batch, n, d]["images_per_s"]}
                 for batch, n, d, run in onnx_runs]
    for row in onnx_rows:
        row["onnx_vs_package"] = row["images_per_s"] / row["package_images_per_s"]
    notes += baseline_targets(baseline, verdicts)
    settings.update(warmup=args.warmup, matmul_size=matmul_size)
    notes += flop_notes(flop_counts, settings)
    mask = max(c["word_mask_s"] / c["split_s"]["decoding"] for c in configs)
    notes.append(f"The benchmark's word mask (see above) takes at most {100 * mask:.1f}% of the decoding time.")
    limit = settings["max_decode_rows"]
    for d in dtypes:
        notes.append(f"{d} matmul rate at one decoding step's shapes (rows = batch x candidates x beams"
                     + (f", at most max_decode_rows = {limit} per LM call" if limit else "")
                     + "), GPT-2 MLP / LM head: "
                     + "; ".join(f"{rows} rows {r['mlp']:.0f} / {r['lm_head']:.0f} GFLOP/s"
                                 for rows, r in step_rates[d].items())
                     + ".")
    result = {**run_facts("generate_throughput"), "device": args.device,
              "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
              "dtypes": dtypes, "reference_dtype": REFERENCE_DTYPE,
              "load_average_1min": [load_before, os.getloadavg()[0]], "settings": settings,
              "lm_tokenizer": LM_TOKENIZER_NOTE, "decoding_notes": [FORCED_NOTE, VOCAB_NOTE],
              "figures": {"matmul_gflops": rates, "matmul_gflops_before": rates_before,
                          "matmul_gflops_after": rates_after,
                          "matmul_gflops_decoding_step": step_rates, "flop_counts": flop_counts, "configs": configs,
                          "baseline": baseline, "onnx": onnx_rows,
                          "onnx_max_abs_diff": onnx_export and onnx_export["max_abs_diff"],
                          "targets": verdicts, "notes": notes}}
    publish(result, report(result), args.out, args.markdown)

if __name__ == "__main__":
    main()

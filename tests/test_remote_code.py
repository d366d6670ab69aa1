"""A checkpoint folder works as remote code in a fresh interpreter that cannot import this package."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import modeling_maccap

from .conftest import random_image

REMOTE_FILES = ["configuration_maccap.py", "modeling_maccap.py", "processing_maccap.py", "pipeline_maccap.py",
                "transformers_compat.py"]

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_maccap"] = None  # the installed package must not be used
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, image_paths = sys.argv[1], sys.argv[2:]
    images = [Image.open(p) for p in image_paths]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    itt = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    captions = processor.batch_decode(model.generate(**processor(images=images)))
    pipe = pipeline("image-to-text", model=folder, trust_remote_code=True)
    print(json.dumps({
        "modules": [type(o).__module__ for o in (config, model, itt, processor, pipe)],
        "classes": [type(o).__name__ for o in (config, model, itt, processor, pipe)],
        "captions": captions,
        "itt_captions": processor.batch_decode(itt.generate(**processor(images=images))),
        "pipe_one": pipe(images[0]),
        "pipe_path": pipe(image_paths[1]),
        "pipe_list": pipe(images),
        "pipe_batched": pipe(images, batch_size=2),
        "pipe_options": pipe(images[0], generate_kwargs={"rerank": False, "max_new_tokens": 2}),
    }))
    """
)


def fresh_process(model_id, image_paths, cwd, extra_env=None):
    """Run FRESH_PROCESS on a folder or Hub id in a new interpreter that cannot import this package."""
    env = {**os.environ, "PYTHONPATH": "", **(extra_env or {})}
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, model_id, *image_paths], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Do you wish to run the custom code" not in run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_saved_folder_holds_code_auto_map_and_pipeline_entry(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert set(REMOTE_FILES) <= names
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_maccap.MacCapConfig",
        "AutoModel": "modeling_maccap.MacCapForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_maccap.MacCapForConditionalGeneration",
    }
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_maccap.MacCapImageToTextPipeline"
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_maccap.MacCapProcessor"}


def test_fresh_process_loads_and_captions_like_the_source_model(model, processor, checkpoint, tmp_path):
    images = [random_image(s) for s in (20, 21, 22)]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    expected = processor.batch_decode(model.generate(**processor(images=images)))
    unranked = processor.batch_decode(model.generate(**processor(images=images[:1]), rerank=False, max_new_tokens=2))

    got = fresh_process(str(checkpoint), paths, tmp_path)

    assert all(m.startswith("transformers_modules.") for m in got["modules"]), got["modules"]
    assert got["classes"] == ["MacCapConfig", "MacCapForConditionalGeneration", "MacCapForConditionalGeneration",
                              "MacCapProcessor", "MacCapImageToTextPipeline"]
    assert got["captions"] == expected
    assert got["itt_captions"] == expected
    assert got["pipe_one"] == [{"generated_text": expected[0]}]
    assert got["pipe_path"] == [{"generated_text": expected[1]}]
    assert got["pipe_list"] == [[{"generated_text": c}] for c in expected]
    assert got["pipe_batched"] == got["pipe_list"]
    assert got["pipe_options"] == [{"generated_text": unranked[0]}]


@pytest.mark.parametrize("name", REMOTE_FILES)
def test_remote_code_imports_only_torch_transformers_and_the_standard_library(name):
    tree = ast.parse((Path(modeling_maccap.__file__).parent / name).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            # Same-folder relative imports only: the loader copies `from .x import` siblings and nothing else.
            assert node.level in (0, 1), f"{name}: only same-folder relative imports work as remote code"
            if node.level == 0:
                roots.add(node.module.split(".")[0])
    assert roots - {"torch", "transformers"} <= set(sys.stdlib_module_names), roots
    # Nor any import the loader cannot see: importlib, __import__, exec/eval of code.
    loaders = {"importlib", "import_module", "__import__", "run_path", "run_module"}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} & (loaders | {"exec", "eval", "compile"})
    used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} & loaders
    assert not used, f"{name} imports dynamically: {sorted(used)}"


def test_the_remote_code_files_are_the_package_top_level_modules():
    """Every module at the package's top is remote code (shipped with the weights); the rest lives in subpackages."""
    top = Path(modeling_maccap.__file__).parent
    assert sorted(p.name for p in top.glob("*.py") if p.name != "__init__.py") == sorted(REMOTE_FILES)

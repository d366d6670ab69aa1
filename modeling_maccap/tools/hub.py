"""Publishing to the Hub (not shipped as remote code): stage the exact repo folder of a trained checkpoint, with
its model card, then create the repo and upload the folder.

Staging and pushing are separate steps, so a failed push (no token, the repo exists, the connection drops)
never loses the staged folder and can be retried as it is.
"""

import json
import shutil
from pathlib import Path

from .errors import MacCapError, read_json
from .hub_config import load_hub_config

# Written into every staging folder (and never uploaded): re-staging may replace only a folder that has it.
STAGING_MARKER = ".maccap-staging"
CARD_TAGS = ["zero-shot-image-captioning", "custom_code", "image-captioning", "text-only-training", "maccap"]

CITATION = """\
@inproceedings{qiu2024maccap,
  title     = {Mining Fine-Grained Image-Text Alignment for Zero-Shot Captioning via Text-Only Training},
  author    = {Qiu, Longtian and Ning, Shan and He, Xuming},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2024},
  note      = {arXiv:2401.02347}
}"""

# Published text-only captioners on the COCO Karpathy test split (CIDEr), for context in the card.
TEXT_ONLY_COCO_CIDER = [("CapDec", 91.8), ("DeCap", 91.2), ("ViECap", 92.9), ("Knight", 98.9), ("SynTIC", 101.1),
                        ("IFCap", 108.0)]


# --------------------------------------------------------------------------------------------- eval results
def read_eval_results(path):
    """An evaluation results file: one object (or a list of them) of the form
    `{"dataset": {"id", "name", "split"}, "metrics": {"CIDEr": 0.95, "BLEU-4": 0.31, ...}}`."""
    data = read_json(path, "evaluation results")
    entries = data if isinstance(data, list) else [data]
    for i, entry in enumerate(entries):
        where = f"{path}" + (f" [{i}]" if isinstance(data, list) else "")
        if not isinstance(entry, dict) or not isinstance(entry.get("dataset"), dict) or "id" not in entry["dataset"]:
            raise MacCapError(f"{where}: needs a 'dataset' object with at least an 'id'")
        metrics = entry.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            raise MacCapError(f"{where}: needs a non-empty 'metrics' object of name -> number")
        bad = [name for name, value in metrics.items() if isinstance(value, bool) or not isinstance(value, (int, float))]
        if bad:
            raise MacCapError(f"{where}: metrics {', '.join(bad)} are not numbers")
    return entries


# ------------------------------------------------------------------------------------------------ model card
def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(hub_config, repo_id, eval_results=(), num_projector_parameters=None, space_id=None):
    """The README.md of the repo: YAML metadata the Hub reads (pipeline, tags, license, base models, datasets,
    model-index) and a body with usage (and a link to the demo Space `space_id`), the training recipe, results,
    limitations and the citation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    def task(metric):  # `maccap vqa` results hold "VQA accuracy ..." metrics, `maccap eval` caption metrics
        return ("visual-question-answering", "Visual question answering") if metric.startswith("VQA") else (
            "image-to-text", "Image captioning")

    results = [
        EvalResult(task_type=task(name)[0], task_name=task(name)[1], dataset_type=entry["dataset"]["id"],
                   dataset_name=entry["dataset"].get("name", entry["dataset"]["id"]),
                   dataset_split=entry["dataset"].get("split"), metric_type=name.lower().replace("-", ""),
                   metric_name=name, metric_value=value)
        for entry in eval_results for name, value in entry["metrics"].items()
    ]
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-to-text", tags=CARD_TAGS, language="en",
        license=hub_config.license, license_name=hub_config.license_name, license_link=hub_config.license_link,
        base_model=[hub_config.clip, hub_config.lm], datasets=hub_config.dataset_ids or None,
        model_name=hub_config.model_name, eval_results=results or None,
    )
    spec = hub_config.corpus
    corpus = (f"[{spec['hub_id']}](https://huggingface.co/datasets/{spec['hub_id']})"
              + (f" (subset `{spec['config']}`)" if spec.get("config") else "")
              + f", split `{spec['split']}`, column `{spec['column']}`"
              if hub_config.dataset_ids else f"the caption file `{Path(spec['file']).name}`")
    settings = hub_config.maccap_settings
    method_rows = [(f"`{k}`", f"`{v}`") for k, v in settings.items()]
    training_rows = [(f"`{k}`", f"`{json.dumps(v)}`") for k, v in hub_config.training_arguments.items()]
    if eval_results:
        evaluation = _table(["dataset", "split", "metric", "value", "scale"],
                            [(e["dataset"].get("name", e["dataset"]["id"]), e["dataset"].get("split", ""), name,
                              f"{value:.4f}", e.get("scale", "")) for e in eval_results
                             for name, value in e["metrics"].items()])
    else:
        evaluation = "This checkpoint was published without an evaluation results file; no scores are claimed."
    from .recipes import recipe_paragraph

    trained = "the projector and the LM" if hub_config.finetune_lm else "only the projector (CLIP and the LM frozen)"
    projector = f" ({num_projector_parameters:,} parameters)" if num_projector_parameters else ""
    demo = (f"\n\nTry it in the browser: [the {space_id} Space](https://huggingface.co/spaces/{space_id}), a "
            "Gradio demo with every reranked candidate and its CLIP score, and a VQA tab." if space_id else "")
    body = f"""
# {hub_config.model_name}

Zero-shot image captioning trained on text only: **MacCap** (Qiu, Ning, He, AAAI-24, "Mining Fine-Grained
Image-Text Alignment for Zero-Shot Captioning via Text-Only Training"). A small projector{projector} maps CLIP
embeddings to prefix embeddings of a frozen causal LM. It was trained on captions alone, with Gaussian noise
injected into the CLIP text embeddings to bridge CLIP's modality gap. At inference the model aggregates image
subregion features and reranks {settings['num_candidates']} noisy candidate captions with CLIP, inside
`generate()`.

- CLIP: [{hub_config.clip}](https://huggingface.co/{hub_config.clip})
- Language model: [{hub_config.lm}](https://huggingface.co/{hub_config.lm})
- Training corpus: {corpus}{demo}

## Usage

The model code ships with the weights, so `trust_remote_code=True` is needed (no extra package).

```python
from transformers import pipeline

captioner = pipeline("image-to-text", model="{repo_id}", trust_remote_code=True)
captioner("photo.jpg")                     # [{{"generated_text": "..."}}]
captioner(["a.jpg", "b.jpg"], batch_size=8)
```

```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=[Image.open("photo.jpg")])
print(processor.batch_decode(model.generate(**inputs)))

# zero-shot VQA: the question, in the prompt format of the config, goes after the image prefix
question = model.format_vqa_prompts(["what is on the table?"])[0]
captioner("photo.jpg", prompt=question, generate_kwargs={{"num_beams": 5}})
```

## Training recipe

{recipe_paragraph(hub_config, corpus, trained)}

Method settings (`MacCapConfig`):

{_table(["field", "value"], method_rows)}

`transformers.TrainingArguments`:

{_table(["argument", "value"], training_rows)}

## Evaluation

{evaluation}

For context, published text-only captioners on the COCO Karpathy test split (CIDEr as papers report it, i.e.
pycocoevalcap's 0-1 score x 100): {", ".join(
        f"{name} {cider}" for name, cider in TEXT_ONLY_COCO_CIDER)}.

## Limitations

- The captioner never saw an image in training. Its captions follow the style and vocabulary of its training
  corpus and can name objects that are not in the image. It inherits the biases of CLIP, the LM and the corpus.
- Reranking keeps the candidate CLIP prefers, which favours CLIP's own notion of a match.
- English only. Noise is drawn per image from a seed (`noise_seed`), so captions are reproducible; pass another
  seed for other candidates.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ----------------------------------------------------------------------------------------------------- stage
def _load_checkpoint(checkpoint_dir):
    from safetensors import SafetensorError

    from ..modeling_maccap import MacCapForConditionalGeneration

    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise MacCapError(f"{checkpoint_dir} is not a checkpoint folder: it has no config.json")
    model_type = read_json(config_file, "checkpoint config").get("model_type")
    if model_type != "maccap":
        raise MacCapError(f"{checkpoint_dir} holds a {model_type!r} model, not a MacCap checkpoint")
    if not any(checkpoint_dir.glob("*.safetensors")) and not (checkpoint_dir / "model.safetensors.index.json").is_file():
        raise MacCapError(f"{checkpoint_dir} has no safetensors weights; maccap publishes (and loads) only "
                          "safetensors, never pickled .bin files")
    try:
        model = MacCapForConditionalGeneration.from_pretrained(checkpoint_dir, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise MacCapError(f"cannot load the checkpoint {checkpoint_dir}: {error}") from None
    if model.processor is None:
        raise MacCapError(f"{checkpoint_dir} has no processor files (processor_config.json, tokenizers): a repo "
                          "without them cannot caption; save the processor beside the weights")
    return model


def _check_matches(model, hub_config):
    wrong = [f"{name}: checkpoint {getattr(model.config, name)!r}, hub config {value!r}"
             for name, value in hub_config.maccap_settings.items() if getattr(model.config, name) != value]
    if wrong:
        raise MacCapError(f"the checkpoint was not trained with {hub_config.path.name}: " + "; ".join(wrong))
    if model.processor.max_caption_length != hub_config.max_caption_length:
        raise MacCapError(f"the checkpoint's processor keeps {model.processor.max_caption_length} caption tokens, "
                          f"{hub_config.path.name} says {hub_config.max_caption_length}")


def _prepare_staging_dir(staging_dir):
    staging_dir = Path(staging_dir)
    if staging_dir.exists() and any(staging_dir.iterdir()):
        if not (staging_dir / STAGING_MARKER).is_file():
            raise MacCapError(f"staging folder {staging_dir} exists and was not made by maccap upload; "
                              "choose another --staging-dir")
        shutil.rmtree(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    (staging_dir / STAGING_MARKER).write_text("staged by maccap upload; not uploaded\n", encoding="utf-8")
    return staging_dir


def stage(checkpoint_dir, hub_config, staging_dir, repo_id=None, eval_results=None, max_shard_size="2GB",
          space_id=None):
    """Write the exact repo folder into `staging_dir`: safetensors weights (sharded above `max_shard_size`),
    config.json with auto_map and the pipeline entry, generation_config.json, processor files, the remote-code
    .py files and README.md (the model card, linking the Space `space_id` if given). `eval_results` is a results
    file path (see `read_eval_results`)."""
    model = _load_checkpoint(checkpoint_dir)
    _check_matches(model, hub_config)
    recipe_file = Path(checkpoint_dir) / "recipe.json"  # written by `maccap train --recipe supervised|clip-reward`
    if not hub_config.recipe and recipe_file.is_file():
        import dataclasses

        hub_config = dataclasses.replace(hub_config, recipe=read_json(recipe_file, "recipe file"))
    results = read_eval_results(eval_results) if eval_results else []
    staging_dir = _prepare_staging_dir(staging_dir)
    model.save_pretrained(staging_dir, max_shard_size=max_shard_size)
    model.processor.save_pretrained(staging_dir)
    card = model_card(hub_config, repo_id or hub_config.repo_id, results,
                      num_projector_parameters=sum(p.numel() for p in model.projector.parameters()),
                      space_id=space_id)
    card.save(staging_dir / "README.md")
    return staging_dir


# ----------------------------------------------------------------------------------------------------- space
# What the Space's requirements.txt pins (those installed), at the versions of the environment that staged it;
# gradio itself comes from the README's sdk_version, as Spaces install it.
SPACE_REQUIREMENTS = ("torch", "torchvision", "transformers", "tokenizers", "safetensors", "huggingface_hub",
                      "pillow", "numpy")
SPACE_MODEL_LINE = "SPACE_MODEL_ID = None"


def space_app_source(model_id):
    """serve_app.py (what `maccap serve` runs) with SPACE_MODEL_ID set to `model_id`: the Space's app.py."""
    source = (Path(__file__).parent / "serve_app.py").read_text(encoding="utf-8")
    if source.count(SPACE_MODEL_LINE) != 1:
        raise AssertionError(f"serve_app.py must hold exactly one line {SPACE_MODEL_LINE!r}")
    return source.replace(SPACE_MODEL_LINE, f"SPACE_MODEL_ID = {json.dumps(model_id)}")


def _installed_version(package):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package).split("+")[0]  # no local label (2.14.1+cpu): PyPI has the plain release
    except PackageNotFoundError:
        return None


def space_requirements():
    versions = [(name, _installed_version(name)) for name in SPACE_REQUIREMENTS]
    return ("# The versions this Space was staged and tested with; gradio comes from README.md's sdk_version.\n"
            + "".join(f"{name}=={v}\n" for name, v in versions if v))


def space_card(hub_config, model_id):
    """The Space's README.md: the Space YAML (sdk, its version, app_file, the model repo) and a short body."""
    from huggingface_hub import SpaceCard, SpaceCardData

    gradio_version = _installed_version("gradio")
    if gradio_version is None:
        raise MacCapError("staging a Space needs gradio, to record the version it runs: pip install \"maccap[serve]\"")
    data = SpaceCardData(title=hub_config.model_name[:60], emoji="🖼️", colorFrom="blue", colorTo="gray",
                         sdk="gradio", sdk_version=gradio_version, app_file="app.py", models=[model_id],
                         license=hub_config.license, short_description="Zero-shot captioning trained on text only",
                         pinned=False)
    body = f"""
# {hub_config.model_name}

The web demo of [{model_id}](https://huggingface.co/{model_id}), MacCap (zero-shot image captioning trained on
text only). The Caption tab shows the caption CLIP kept and every reranked candidate with its CLIP score; the VQA
tab answers a question about an image. `app.py` loads the model with
`AutoModel.from_pretrained("{model_id}", trust_remote_code=True)`; it is the app of `maccap serve`, which runs
the same page locally.
"""
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}")


def stage_space(hub_config, model_id, staging_dir):
    """Write the Space repo for the model repo `model_id` into `staging_dir`: app.py, requirements.txt, README.md."""
    staging_dir = _prepare_staging_dir(staging_dir)
    (staging_dir / "app.py").write_text(space_app_source(model_id), encoding="utf-8")
    (staging_dir / "requirements.txt").write_text(space_requirements(), encoding="utf-8")
    space_card(hub_config, model_id).save(staging_dir / "README.md")
    return staging_dir


# ------------------------------------------------------------------------------------------------------ push
def push(staging_dir, repo_id, private=False, revision=None, commit_message=None, exist_ok=False, repo_type=None):
    """Create `repo_id` and upload the staged folder as one commit (to branch `revision`, created if needed).
    `repo_type` "space" makes a Gradio Space. The token comes from HF_TOKEN or `hf auth login`. Returns the
    commit URL."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    staging_dir = Path(staging_dir)
    kept = f"the staged folder {staging_dir} is kept"
    token = get_token()
    if token is None:
        raise MacCapError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again; {kept}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type,
                        space_sdk="gradio" if repo_type == "space" else None)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 409:
            raise MacCapError(f"the repo {repo_id} already exists on {constants.ENDPOINT}; pass --exist-ok to add a "
                              f"commit to it; {kept}") from None
        raise MacCapError(f"cannot create the repo {repo_id}: {error}; {kept}") from None
    except Exception as error:  # noqa: BLE001 - connection errors come from the HTTP client's own hierarchy
        raise MacCapError(f"cannot reach {constants.ENDPOINT} to create {repo_id}: {error!r}; {kept}") from None
    try:
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
        info = api.upload_folder(folder_path=staging_dir, repo_id=repo_id, revision=revision, repo_type=repo_type,
                                 commit_message=commit_message or "Upload MacCap checkpoint",
                                 ignore_patterns=[STAGING_MARKER])
    except Exception as error:  # noqa: BLE001 - a dropped connection, an HTTP error, a full disk: same advice
        raise MacCapError(f"upload of {staging_dir} to {repo_id} failed: {error!r}; {kept}: push it again with "
                          "--exist-ok") from None
    return info.commit_url


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(commands):
    up = commands.add_parser("upload", help="stage a trained checkpoint as a Hub repo (model card included) and push it")
    up.add_argument("checkpoint", help="the trained model folder (safetensors weights and processor files)")
    up.add_argument("--hub-config", required=True, help="the hub_configs/*.json the checkpoint was trained with")
    up.add_argument("--repo-id", help="ORG/NAME (default: the hub config's repo_id)")
    up.add_argument("--eval-results", help="evaluation results JSON to put into the card's model-index")
    up.add_argument("--staging-dir", help="where the repo folder is staged (default: CHECKPOINT-hub-staging)")
    up.add_argument("--max-shard-size", default="2GB", help="weights are sharded above this (default: %(default)s)")
    up.add_argument("--dry-run", action="store_true", help="stage only; push nothing")
    up.add_argument("--private", action="store_true", help="create the repo private")
    up.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    up.add_argument("--commit-message", help="commit message (default: 'Upload MacCap checkpoint')")
    up.add_argument("--exist-ok", action="store_true", help="add a commit to a repo that already exists")
    up.add_argument("--space", metavar="ORG/NAME", help="also stage (in STAGING_DIR-space) and push a Gradio Space "
                                                        "that serves the model: maccap serve's page")
    up.set_defaults(run=run)
    return up


def run(args):
    hub_config = load_hub_config(args.hub_config)
    repo_id = args.repo_id or hub_config.repo_id
    if args.space and args.revision:
        raise MacCapError("--space with --revision: a Space runs its main branch and loads the model repo's main "
                          "branch; push the model to main, or the Space later")
    checkpoint = Path(args.checkpoint)
    staging_dir = Path(args.staging_dir or checkpoint.parent / f"{checkpoint.name}-hub-staging")
    stage(checkpoint, hub_config, staging_dir, repo_id=repo_id, eval_results=args.eval_results,
          max_shard_size=args.max_shard_size, space_id=args.space)
    print(f"staged {repo_id} in {staging_dir}")
    space_dir = Path(f"{staging_dir}-space")
    if args.space:
        stage_space(hub_config, repo_id, space_dir)
        print(f"staged the Space {args.space} in {space_dir}")
    if args.dry_run:
        return 0
    url = push(staging_dir, repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message, exist_ok=args.exist_ok)
    print(f"pushed {staging_dir} to {repo_id}: {url}")
    if args.space:  # after the model: the Space loads it when it starts
        url = push(space_dir, args.space, private=args.private, exist_ok=args.exist_ok, repo_type="space",
                   commit_message=args.commit_message or "Upload the MacCap demo Space")
        print(f"pushed {space_dir} to the Space {args.space}: {url}")
    return 0

"""The MacCap web demo: a Gradio app around a loaded MacCap model (`maccap serve`, and a Space's app.py).

This one file is both. `maccap serve` imports it and calls `build_demo` and `launch` with a model it loaded;
`upload.py --space` copies it verbatim as the Space's app.py, with SPACE_MODEL_ID set to the model repo, and
there `main()` loads the model from the Hub as remote code. So it imports only gradio, torch, transformers, PIL
and the standard library, never the maccap package, and uses only the model's public API: `generate`
(every candidate with its CLIP score), `answer` and the processor.

Requests from several users are batched (Gradio's batched queue): one call of `caption_batch` gets up to
MAX_BATCH_SIZE requests, and the requests with the same settings (candidates, beams, max tokens, noise seed)
share one `generate` call, as `generate`'s options are per call. Noise is seeded per image, so a caption does
not depend on the batch it ran in. A bad upload gets a message in its own request's status and the others
are answered.
"""

import logging
import os
import tempfile
import warnings
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw

# Filled in by `upload.py --space` in the Space's copy of this file: the model repo the Space serves.
SPACE_MODEL_ID = None

MAX_BATCH_SIZE = 8  # requests per batch, from any number of users
# Uploads above this are refused before they are decoded: a 10000x10000 image (100 megapixels) would take
# 300 MB decoded and its captions would come from a 224-px thumbnail anyway.
MAX_PIXELS = 40_000_000
MAX_IMAGES_PER_REQUEST = 16

logger = logging.getLogger("maccap.serve")


class UploadError(Exception):
    """An upload that is not a usable image; the message names the file and what is wrong."""


# ------------------------------------------------------------------------------------------------ uploads
def read_upload(path):
    """The image in an uploaded file, decoded; UploadError for an empty file, a file that is not an image, a
    truncated or corrupt one, or one over MAX_PIXELS."""
    name = Path(path).name
    if os.path.getsize(path) == 0:
        raise UploadError(f"{name}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise UploadError(f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over "
                                      f"this demo's limit of {MAX_PIXELS / 1e6:.0f} megapixels; downscale it")
                image.load()  # decode now: a truncated file fails here
                return image.copy()
    except Image.DecompressionBombError:  # PIL's own limit, met when opening
        raise UploadError(f"{name}: over this demo's limit of {MAX_PIXELS / 1e6:.0f} megapixels") from None
    except Image.UnidentifiedImageError:
        raise UploadError(f"{name}: not an image (or a format PIL cannot read)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UploadError(f"{name}: the image is truncated or corrupt ({error})") from None


def read_uploads(paths):
    """(images, paths, errors) of a request's files: the images that decoded, their files, and a message per file
    that did not. UploadError when there is nothing to caption."""
    paths = [p for p in (paths or []) if p]
    if not paths:
        raise UploadError("Upload one or more images (or pick an example).")
    if len(paths) > MAX_IMAGES_PER_REQUEST:
        raise UploadError(f"{len(paths)} images: upload at most {MAX_IMAGES_PER_REQUEST} at a time")
    images, good, errors = [], [], []
    for path in paths:
        try:
            images.append(read_upload(path))
            good.append(path)
        except UploadError as error:
            errors.append(str(error))
    if not images:
        raise UploadError("Not captioned: " + "; ".join(errors))
    return images, good, errors


# ---------------------------------------------------------------------------------------------- captioning
def caption_images(model, processor, images, num_candidates, num_beams, max_new_tokens, noise_seed):
    """One `generate` call -> per image (kept caption, [(candidate, CLIP score), ...] best first)."""
    inputs = processor(images=images, return_tensors="pt")
    out = model.generate(pixel_values=inputs["pixel_values"].to(model.device), rerank=True,
                         output_candidates=True, num_candidates=num_candidates, num_beams=num_beams,
                         max_new_tokens=max_new_tokens, noise_seed=noise_seed)
    kept = processor.batch_decode(out.sequences)
    results = []
    for i, caption in enumerate(kept):
        candidates = processor.batch_decode(out.candidates[i])
        scores = out.candidate_scores[i].float().tolist()
        results.append((caption, sorted(zip(candidates, scores), key=lambda pair: -pair[1])))
    return results


def request_outputs(paths, results):
    """What one request shows: the gallery (image, caption), the captions text, the candidates table."""
    names = [Path(path).name for path in paths]
    gallery = [(path, f"{name}: {caption}") for name, path, (caption, _) in zip(names, paths, results)]
    text = "\n".join(f"{name}: {caption}" for name, (caption, _) in zip(names, results))
    rows = [[name, candidate, round(score, 4), "kept" if rank == 0 else ""]
            for name, (caption, candidates) in zip(names, results)
            for rank, (candidate, score) in enumerate(candidates)]
    return gallery, text, rows


def make_caption_batch(model, processor):
    def caption_batch(files, num_candidates, num_beams, max_new_tokens, noise_seed):
        """Gradio's batched event: one list per input, one entry per request; one list per output."""
        n = len(files)
        logger.info("caption batch started: %d requests", n)
        galleries, texts, tables, statuses = [[]] * n, [""] * n, [[]] * n, [""] * n
        groups = {}  # settings -> [(request, images, paths)]
        for i in range(n):
            try:
                images, paths, errors = read_uploads(files[i])
            except UploadError as error:
                statuses[i] = str(error)
                continue
            statuses[i] = "Not captioned: " + "; ".join(errors) if errors else ""
            settings = (int(num_candidates[i]), int(num_beams[i]), int(max_new_tokens[i]), int(noise_seed[i]))
            groups.setdefault(settings, []).append((i, images, paths))
        for settings, requests in groups.items():
            results = caption_images(model, processor, [image for _, images, _ in requests for image in images],
                                     *settings)
            for i, images, paths in requests:
                mine, results = results[:len(images)], results[len(images):]
                galleries[i], texts[i], tables[i] = request_outputs(paths, mine)
        logger.info("caption batch: %d requests, %d images, %d generate calls", n,
                    sum(len(images) for requests in groups.values() for _, images, _ in requests), len(groups))
        return galleries, texts, tables, statuses

    return caption_batch


def make_answer_batch(model, processor):
    def answer_batch(files, questions, noise_seed):
        """VQA requests: the valid ones with the same noise seed share one `answer` call."""
        n = len(files)
        answers, statuses = [""] * n, [""] * n
        groups = {}
        for i in range(n):
            try:
                if not (questions[i] or "").strip():
                    raise UploadError("Ask a question about the image.")
                (image,), _, _ = read_uploads([files[i]] if files[i] else [])
            except UploadError as error:
                statuses[i] = str(error)
                continue
            groups.setdefault(int(noise_seed[i]), []).append((i, image, questions[i]))
        for seed, requests in groups.items():
            inputs = processor(images=[image for _, image, _ in requests], return_tensors="pt")
            got = model.answer(inputs["pixel_values"].to(model.device), [q for _, _, q in requests],
                               processor=processor, noise_seed=seed)
            for (i, _, _), answer in zip(requests, got):
                answers[i] = answer
        logger.info("answer batch: %d requests, %d answer calls", n, len(groups))
        return answers, statuses

    return answer_batch


# ------------------------------------------------------------------------------------------------ the page
def example_images(folder):
    """Three drawn scenes (a shape on a background) as PNG files in `folder`, for the examples."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = [("red-circle.png", (20, 20, 30), (220, 40, 40), "ellipse"),
              ("blue-square.png", (128, 128, 128), (40, 70, 220), "rectangle"),
              ("green-triangle.png", (235, 235, 225), (40, 170, 60), "triangle")]
    paths = []
    for name, background, colour, shape in scenes:
        image = Image.new("RGB", (224, 224), background)
        draw = ImageDraw.Draw(image)
        if shape == "triangle":
            draw.polygon([(112, 40), (190, 184), (34, 184)], fill=colour)
        else:
            getattr(draw, shape)([48, 48, 176, 176], fill=colour)
        image.save(folder / name)
        paths.append(str(folder / name))
    return paths


def build_demo(model, processor, title="MacCap", examples_dir=None):
    """The page: a Caption tab and a VQA tab around `model` (a MacCap model, local or remote code)."""
    config, generation = model.config, model.generation_config
    examples = example_images(examples_dir or tempfile.mkdtemp(prefix="maccap-serve-examples-"))
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nZero-shot image captioning trained on text only (MacCap, AAAI-24). Each image "
                    "gets several noisy candidate captions; CLIP keeps the one closest to the image.")
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="Images", file_count="multiple", elem_id="upload")
                    with gr.Accordion("Decoding", open=False):
                        num_candidates = gr.Slider(1, 16, value=config.num_candidates, step=1,
                                                   label="Candidates (reranked by CLIP)")
                        num_beams = gr.Slider(1, 8, value=generation.num_beams or 1, step=1, label="Beams")
                        max_new_tokens = gr.Slider(1, 64, value=generation.max_new_tokens or 16, step=1,
                                                   label="Max new tokens")
                        noise_seed = gr.Number(0, precision=0, label="Noise seed")
                    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    gr.Examples([[[path]] for path in examples] + [[examples]], inputs=[files],
                                label="Examples")
                with gr.Column():
                    status = gr.Markdown(elem_id="caption-status")
                    captions = gr.Textbox(label="Kept captions", lines=3, elem_id="captions")
                    gallery = gr.Gallery(label="Captioned", columns=4, height=220, object_fit="contain")
                    table = gr.Dataframe(headers=["image", "candidate", "CLIP score", "kept"],
                                         label="Every candidate, best first", wrap=True,
                                         column_widths=["24%", "50%", "14%", "12%"])
            button.click(make_caption_batch(model, processor),
                         [files, num_candidates, num_beams, max_new_tokens, noise_seed],
                         [gallery, captions, table, status], batch=True, max_batch_size=MAX_BATCH_SIZE,
                         api_name="caption")
        with gr.Tab("VQA"):
            with gr.Row():
                with gr.Column():
                    vqa_file = gr.File(label="Image", file_count="single", elem_id="vqa-upload")
                    question = gr.Textbox(label="Question", placeholder="what is in the picture?")
                    vqa_seed = gr.Number(0, precision=0, label="Noise seed")
                    ask = gr.Button("Answer", variant="primary", elem_id="answer-button")
                with gr.Column():
                    vqa_status = gr.Markdown(elem_id="answer-status")
                    answer = gr.Textbox(label="Short answer", elem_id="answer")
            ask.click(make_answer_batch(model, processor), [vqa_file, question, vqa_seed], [answer, vqa_status],
                      batch=True, max_batch_size=MAX_BATCH_SIZE, api_name="answer")
    return demo


def log_batches():
    """The batch log (one line per batch run: requests, images, generate calls) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def launch(demo, host="127.0.0.1", port=7860):
    """Serve the page (blocks). System fonts only: the page loads nothing from outside the server."""
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, theme=theme,
                                                   show_error=True)


def main():
    """The Space: the model repo as remote code (no maccap package), on GRADIO_SERVER_NAME/PORT."""
    from transformers import AutoModel, AutoProcessor

    log_batches()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModel.from_pretrained(SPACE_MODEL_ID, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(SPACE_MODEL_ID, trust_remote_code=True)
    launch(build_demo(model, processor, title=SPACE_MODEL_ID), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()

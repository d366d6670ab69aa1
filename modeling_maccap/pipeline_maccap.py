"""`pipeline("image-to-text", model=..., trust_remote_code=True)` for MacCap.

transformers 5 folded "image-to-text" into "image-text-to-text", which insists on a text prompt; MacCap captions
a bare image, so the saved config.json names this class under "image-to-text" in `custom_pipelines`.
"""

from .transformers_compat import pipeline_generate_kwargs  # first: it checks the transformers version

from transformers import Pipeline  # noqa: E402, I001


class MacCapImageToTextPipeline(Pipeline):
    """Captions images (a PIL image, numpy array, path, or a list of them) -> [{"generated_text": ...}] per image.
    `prompt=` adds text after the prefix (e.g. a VQA prompt); `generate_kwargs=` and `max_new_tokens=` reach
    `model.generate` (e.g. `generate_kwargs={"rerank": False, "num_candidates": 8, "noise_seed": 1}`)."""

    # What pipeline() loads beside the model, and the generation hooks of the Pipeline base (transformers_compat
    # lists these flags; a test checks that transformers still reads them).
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True
    _default_generation_config = None  # the model's generation_config holds MacCap's decoding defaults

    def _sanitize_parameters(self, prompt=None, max_new_tokens=None, generate_kwargs=None, **kwargs):
        if kwargs:
            raise ValueError(f"unknown pipeline arguments {sorted(kwargs)}: pass generation options in generate_kwargs")
        preprocess_params = {} if prompt is None else {"prompt": prompt}
        generate_kwargs = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        return preprocess_params, {"generate_kwargs": generate_kwargs}, {}

    def preprocess(self, image, prompt=None):
        return self.processor(images=image, text=prompt, return_tensors="pt")

    def _forward(self, model_inputs, generate_kwargs=None):
        generate_kwargs = pipeline_generate_kwargs(self, generate_kwargs or {})
        sequences = self.model.generate(**model_inputs, processor=self.processor, **generate_kwargs)
        # A dict of per-row tensors, so the pipeline can split a batch back into items.
        return {"new_tokens": sequences[:, model_inputs["input_ids"].shape[1]:]}

    def postprocess(self, model_outputs):
        return [{"generated_text": text} for text in self.processor.batch_decode(model_outputs["new_tokens"])]


__all__ = ["MacCapImageToTextPipeline"]

"""MacCap configuration: a frozen CLIP, a trainable projector (queries + aligner + MLP), a frozen causal LM."""

from .transformers_compat import SubConfigSpec, is_causal_lm_type, strict  # first: it checks the transformers version

from transformers import AutoConfig, CLIPConfig, PreTrainedConfig  # noqa: E402, I001

SUBREGION_MODES = ("attention", "cls")


@strict
class MacCapConfig(PreTrainedConfig):
    r"""
    Configuration of [`MacCapForConditionalGeneration`]. Every number defaults to the paper's reference setting
    (CLIP ViT-B/32, 32 queries, one aligner layer, k = 10 subregions, noise variance 0.016, 4 reranked candidates).

    Args:
        clip_config (`CLIPConfig` or `dict`): the CLIP model whose vision tower gives the subregion features and
            whose text tower embeds captions (training) and candidates (reranking).
        text_config (`PreTrainedConfig` or `dict`): any causal LM known to `AutoModelForCausalLM` (GPT-2 by default).
        num_queries (`int`): learned query vectors of the projector = number of prefix embeddings given to the LM.
        aligner_layers / aligner_heads / aligner_ffn_dim / aligner_dropout: the DETR-style transformer decoder
            in which the queries cross-attend to the k noisy features (post-norm, ReLU).
        num_subregions (`int`): k, the number of features per example (subregions at inference, noisy copies in
            training).
        subregion_mode (`str`): "attention" (the reference's subregion aggregation from the last layer's
            attention) or "cls" (k copies of the global image embedding, the ablation).
        subregion_temperature (`float`): temperature of the softmax over attention rows that mixes patch tokens.
        patch_weight (`float`): weight of the mixed patch feature added to the global embedding.
        train_noise_variance (`float`): variance of the Gaussian noise injected into text embeddings in training.
        inference_noise_variance (`float`): variance of the noise injected into image features at inference.
        num_candidates (`int`): noisy draws (candidate captions) per image when reranking.
        rerank (`bool`): whether `generate()` reranks the candidates with CLIP by default.
        rerank_max_characters (`int`, *optional*): score each candidate on its first this many characters (the
            reference code's 80, set by `maccap convert-original`); None scores the whole caption (up to CLIP's 77
            tokens).
        vqa_prompt (`str`): the zero-shot VQA prompt placed after the prefix; must contain "{question}".

        PCM-Net (Luo et al., ECCV-24; off by default, and then nothing below changes an output):
        patch_keys (`bool`): the aligner's keys also hold the image's projected, L2-normalised patch tokens, after
            the k features (a model trained on (image, caption) pairs; text-only training has no patches).
        concepts (`list[str]`, *optional*): the concept vocabulary; its prompt-ensembled CLIP text embeddings are
            the `concept_embeds` buffer saved with the weights, and `concept_projection` maps a patch's concept
            feature into the aligner's keys. Needs `patch_keys`.
        salient_concepts (`int`): the image's top concepts by softmax(cos(image, concept) / concept_temperature).
        concept_pairs (`int`): the top (patch, concept) pairs of the joint softmax; their patches are the selected
            ones (mixed up in training, given a concept token at inference).
        concept_temperature (`float`): the temperature of the three softmaxes above (0.01 in the paper).
        concept_tokens (`bool`): at inference, append the concept tokens of the selected patches to the keys.
    """

    model_type = "maccap"
    sub_configs_defaults = {
        "clip_config": CLIPConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
    }

    clip_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_queries: int = 32
    aligner_layers: int = 1
    aligner_heads: int = 8
    aligner_ffn_dim: int = 2048
    aligner_dropout: float = 0.1
    num_subregions: int = 10
    subregion_mode: str = "attention"
    subregion_temperature: float = 1.0
    patch_weight: float = 1.0
    train_noise_variance: float = 0.016
    inference_noise_variance: float = 0.016
    num_candidates: int = 4
    rerank: bool = True
    rerank_max_characters: int | None = None
    vqa_prompt: str = "Question: {question} Short answer:"
    # PCM-Net (off by default).
    patch_keys: bool = False
    concepts: list[str] | None = None
    salient_concepts: int = 5
    concept_pairs: int = 5
    concept_temperature: float = 0.01
    concept_tokens: bool = True

    def __post_init__(self, **kwargs):
        # A composite config resets the sub-configs' attention implementation unless told otherwise; the
        # sub-config objects are shared with the loaded CLIP and LM, so keep them on SDPA.
        kwargs.setdefault("attn_implementation", {"clip_config": "sdpa", "text_config": "sdpa"})
        super().__post_init__(**kwargs)

    def validate_subregion_mode(self):
        if self.subregion_mode not in SUBREGION_MODES:
            raise ValueError(f"subregion_mode must be one of {SUBREGION_MODES}, got {self.subregion_mode!r}")

    def validate_text_config(self):
        if self.text_config is not None and not isinstance(self.text_config, dict):
            model_type = getattr(self.text_config, "model_type", None)
            if not is_causal_lm_type(model_type):
                raise ValueError(
                    f"text_config must be the config of a causal LM (one AutoModelForCausalLM knows), "
                    f"got model_type {model_type!r}"
                )

    def validate_sizes(self):
        for name in ("num_queries", "aligner_layers", "aligner_heads", "aligner_ffn_dim", "num_subregions",
                     "num_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_noise_variance", "inference_noise_variance", "aligner_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rerank_max_characters is not None and self.rerank_max_characters < 1:
            raise ValueError(f"rerank_max_characters must be >= 1 or None, got {self.rerank_max_characters}")
        if self.subregion_temperature <= 0:
            raise ValueError(f"subregion_temperature must be > 0, got {self.subregion_temperature}")

    def validate_vqa_prompt(self):
        if "{question}" not in self.vqa_prompt:
            raise ValueError(f"vqa_prompt must contain '{{question}}', got {self.vqa_prompt!r}")

    def validate_concepts(self):
        for name in ("salient_concepts", "concept_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.concept_temperature <= 0:
            raise ValueError(f"concept_temperature must be > 0, got {self.concept_temperature}")
        if self.concepts is None:
            return
        if not self.patch_keys:
            raise ValueError("concepts need patch_keys=True: the concept features mix into the patch keys")
        bad = [c for c in self.concepts if not isinstance(c, str) or not c.strip()]
        if bad or len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"concepts must be distinct non-empty strings, got {len(bad)} empty and "
                             f"{len(self.concepts) - len(set(self.concepts))} repeated")
        if self.salient_concepts > len(self.concepts):
            raise ValueError(f"salient_concepts={self.salient_concepts} exceeds the {len(self.concepts)} concepts")

    @property
    def projector_dim(self) -> int:
        """Width of the projector: CLIP's joint embedding space (512 for ViT-B/32)."""
        return self.clip_config.projection_dim


__all__ = ["MacCapConfig"]

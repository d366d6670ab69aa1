"""maccap: zero-shot image captioning trained on text only (MacCap, AAAI-24) as a transformers model."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_maccap import MacCapConfig
from .modeling_maccap import MacCapForConditionalGeneration, MacCapPreTrainedModel
from .pipeline_maccap import MacCapImageToTextPipeline
from .processing_maccap import MacCapProcessor, clean_caption

# With the package imported, the Auto classes know MacCap without remote code.
AutoConfig.register("maccap", MacCapConfig, exist_ok=True)
AutoModel.register(MacCapConfig, MacCapForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MacCapConfig, MacCapForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MacCapConfig, MacCapProcessor, exist_ok=True)

__all__ = [
    "MacCapConfig",
    "MacCapForConditionalGeneration",
    "MacCapImageToTextPipeline",
    "MacCapPreTrainedModel",
    "MacCapProcessor",
    "clean_caption",
]

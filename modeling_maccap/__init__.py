"""maccap: zero-shot image captioning trained on text only (MacCap, AAAI-24) as a transformers model."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_maccap import MacCapConfig
from .modeling_maccap import MacCapForConditionalGeneration, MacCapPreTrainedModel
from .pipeline_maccap import MacCapImageToTextPipeline
from .processing_maccap import MacCapProcessor, clean_caption, register_clip_source
from .tools import open_clip_conversion

# With the package installed, "open_clip:ARCH/TAG" names a CLIP for from_pretrained_components (open_clip itself is
# imported only when such a spec is loaded; pip install 'maccap[open_clip]').
register_clip_source(open_clip_conversion.PREFIX, open_clip_conversion.load_clip, open_clip_conversion.load_processors)

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

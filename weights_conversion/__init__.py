"""SAM weight conversion: Meta's .pth and Hugging Face safetensors -> Flax (orbax checkpoint + config.json)."""

from weights_conversion.convert import ConversionError, convert, convert_state, read_checkpoint

__all__ = ["ConversionError", "convert", "convert_state", "read_checkpoint"]

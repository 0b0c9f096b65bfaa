"""llava-ray: Ray-distributed training of LLaVA-style vision-language assistants."""

__version__ = "0.1.0"

"""imgbatch: resumable batch image generation through OpenAI-compatible gateways."""

__version__ = "0.1.0"

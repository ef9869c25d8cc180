"""Provider names, as the manifest's ``endpoints:`` and ``--provider`` spell them, to clients."""

from __future__ import annotations

from batch.endpoints import CHAT, GEMINI, OPENAI_IMAGES
from batch.providers.base import ClientConfig, Provider
from batch.providers.chat import ChatCompletionsClient
from batch.providers.gemini import GeminiClient
from batch.providers.openai_images import OpenAIImagesClient


def build(provider: str, config: ClientConfig) -> Provider:
    """A client of ``provider`` (one of batch.endpoints.PROVIDERS) for ``config``."""
    clients: dict[str, type[ChatCompletionsClient | GeminiClient | OpenAIImagesClient]] = {
        CHAT: ChatCompletionsClient, GEMINI: GeminiClient, OPENAI_IMAGES: OpenAIImagesClient,
    }
    return clients[provider](config)

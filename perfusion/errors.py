"""Domain errors of the Perfusion core.

Every error says what is wrong and how to fix it. They are plain picklable exceptions (a message), because
they cross Ray process boundaries. Each means the input itself is bad (a corrupt file, a wrong base model):
a retry would fail the same way, so the pipeline records it and never retries it.
"""

from __future__ import annotations


class PerfusionError(Exception):
    """Base class of every error this package raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # Subclasses keep the one-argument constructor, so pickling needs only the message.
        return (type(self), (self.message,))


class BaseModelError(PerfusionError):
    """A base model could not be found, loaded or recognised."""


class ConceptFileError(PerfusionError):
    """A concept file is unreadable, malformed, too new, or belongs to another base model."""


class ConceptTokenError(PerfusionError):
    """A concept token is malformed or collides with a word the tokenizer already knows."""


class CovarianceError(PerfusionError):
    """The text-encoder covariance could not be estimated, inverted or loaded."""


class TrainingError(PerfusionError):
    """Training inputs are unusable (no images, an image that does not decode, a bad config)."""


class RenderError(PerfusionError):
    """A render request is inconsistent with the concepts that are attached."""

"""The package's exceptions: one root, each subclass also a matching built-in."""

from __future__ import annotations

__all__ = [
    "AiosError",
    "CardFormatError",
    "CardMismatchError",
    "InputError",
    "BackendUnavailableError",
    "TrainingDivergedError",
    "SkillRejectedError",
]


class AiosError(Exception):
    """Root of every error raised by aios_fast."""


class CardFormatError(AiosError, ValueError):
    """A skill card file or LoRACard is corrupt, truncated, inconsistent or hostile."""


class CardMismatchError(AiosError, ValueError):
    """A card does not fit the model it is applied to (no matching module, wrong shapes)."""


class InputError(AiosError, ValueError):
    """An argument has the wrong dtype, shape, device, layout or value."""


class BackendUnavailableError(AiosError, RuntimeError):
    """The requested kernel implementation is not built or cannot run on this machine."""


class TrainingDivergedError(AiosError, RuntimeError):
    """Training produced a NaN or exploding loss and was stopped; no card was made."""


class SkillRejectedError(AiosError, RuntimeError):
    """A card failed the validation gate and may not be saved or published."""

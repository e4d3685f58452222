"""Data formats: MATLAB's dimension letters, read row-major (``format``) or column-major
(``matlab_format``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NormgenError

LETTERS = "SCBTU"
LETTER_NAMES = {"S": "spatial", "C": "channel", "B": "batch", "T": "time", "U": "unspecified"}


@dataclass(frozen=True)
class Format:
    """A validated row-major format: ``letters[0]`` is the outermost (slowest) dimension."""

    letters: str

    @property
    def has_batch(self) -> bool:
        return "B" in self.letters

    @property
    def channel_axis(self) -> int:
        return self.letters.index("C")

    def non_batch_letters(self) -> str:
        return self.letters.replace("B", "")

    def __str__(self) -> str:
        return self.letters


def parse_format(text: object, *, what: str = "format") -> Format:
    """Check a row-major format string: one C, at most one B and one T, any S and U."""
    if not isinstance(text, str) or not text:
        shown = repr(text) if len(repr(text)) <= 80 and "\n" not in repr(text) else f"a {type(text).__name__}"
        raise NormgenError(f"{what} must be a non-empty string of the letters S, C, B, T, U, got {shown}")
    for ch in text:
        if ch not in LETTERS:
            raise NormgenError(
                f"{what} {text!r} has unknown dimension letter {ch!r}; "
                "allowed letters are S (spatial), C (channel), B (batch), T (time), U (unspecified)"
            )
    n_c = text.count("C")
    if n_c != 1:
        raise NormgenError(f"{what} {text!r} must have exactly one C (channel) dimension, it has {n_c}")
    for ch in "BT":
        if text.count(ch) > 1:
            raise NormgenError(
                f"{what} {text!r} has {text.count(ch)} {ch} ({LETTER_NAMES[ch]}) dimensions; at most one is allowed"
            )
    return Format(text)


def from_matlab(matlab_format: object) -> Format:
    """MATLAB's column-major format (first letter fastest) as a row-major :class:`Format`."""
    fmt = parse_format(matlab_format, what="matlab_format")
    return Format(fmt.letters[::-1])

"""Token labels for matplotlib plots that read well with or without a font that draws Chinese.

matplotlib's bundled fonts have no Chinese glyphs: pieces would render as
empty boxes. `use_chinese_font` looks for an installed font that has them and
makes it the default; `token_labels` then labels axes with the pieces, and
otherwise with their positions, which `token_table` lists beside the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

__all__ = ["token_labels", "token_table", "use_chinese_font"]

# Families that usually carry the CJK Unified Ideographs, tried before any other installed font.
_LIKELY_FAMILIES = ("Noto Sans CJK", "Noto Serif CJK", "Source Han", "WenQuanYi", "Droid Sans Fallback",
                    "SimHei", "Microsoft YaHei", "PingFang", "Heiti", "STHeiti", "AR PL", "Sarasa")
_PROBE = "中文的a1"
_UNASSIGNED = 0x0378  # no character: a font that maps it draws placeholders (as "Last Resort" does)


def _draws_chinese(path: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        charmap = FT2Font(path).get_charmap()
    except (OSError, RuntimeError):
        return False
    return all(ord(c) in charmap for c in _PROBE) and _UNASSIGNED not in charmap


def use_chinese_font() -> str | None:
    """Make an installed font that draws Chinese matplotlib's first sans-serif; its name, or None if none is."""
    from matplotlib import font_manager, rcParams

    fonts = font_manager.fontManager.ttflist
    likely = [f for f in fonts if any(f.name.startswith(family) for family in _LIKELY_FAMILIES)]
    for font in likely + [f for f in fonts if f not in likely]:
        if _draws_chinese(font.fname):
            rcParams["font.sans-serif"] = [font.name, *rcParams["font.sans-serif"]]
            rcParams["font.family"] = "sans-serif"
            rcParams["axes.unicode_minus"] = False
            return font.name
    return None


def token_labels(tokenizer: Tokenizer, ids: Sequence[int], chinese: bool) -> list[str]:
    """Axis labels for tokens: each piece when `chinese` text can be drawn, else its position (see token_table)."""
    if chinese:
        return [tokenizer.id_to_piece(int(i)) for i in ids]
    return [str(position) for position in range(len(ids))]


def token_table(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Position, id and piece of each token, one a line: the key to labels by position."""
    return "\n".join(f"{position:>4}  {int(i):>6}  {tokenizer.id_to_piece(int(i))}" for position, i in enumerate(ids))

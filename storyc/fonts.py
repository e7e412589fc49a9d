"""The storyboard's caption font: found without importing PIL, so compile/status stay light.

Order: STORYC_FONT (a .ttf/.otf/.ttc path, optionally ``path#index`` for a collection), then the Noto Sans CJK
collection that the project's own install brings (the ``noto-cjk-sans-otc`` wheel, face 2 = Simplified
Chinese), then common system CJK fonts. The font's name and sha256 are an input of the bundle stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSTEM_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc#2", "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc", "C:/Windows/Fonts/msyh.ttc",
)
PACKAGED_FACE = 2  # NotoSansCJK-Regular.ttc faces: 0 JP, 1 KR, 2 SC, 3 TC, 4 HK


@dataclass(frozen=True)
class Font:
    path: Path
    index: int  # the face inside a .ttc collection
    source: str  # STORYC_FONT | package | system

    @property
    def name(self) -> str:
        return f"{self.path.name}#{self.index}" if self.index else self.path.name


def _parse(text: str, source: str) -> Font | None:
    path, _, index = text.partition("#")
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    return Font(p, int(index) if index.isdigit() else 0, source)


def _packaged() -> Font | None:
    from importlib.util import find_spec

    spec = find_spec("noto_cjk_sans_otc")  # locate, do not import: a data-only package
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "NotoSansCJK-Regular.ttc"
    return Font(p, PACKAGED_FACE, "package") if p.is_file() else None


def find_font() -> Font | None:
    """The caption font, or None when no CJK font is installed anywhere."""
    env = os.environ.get("STORYC_FONT")
    if env:
        found = _parse(env, "STORYC_FONT")
        if found is None:
            from .errors import StorycError

            raise StorycError(f"STORYC_FONT={env}: no such font file",
                              "point it at a .ttf/.otf/.ttc file (path#N picks face N of a .ttc), or unset it")
        return found
    found = _packaged()
    if found is not None:
        return found
    for cand in SYSTEM_FONTS:
        found = _parse(cand, "system")
        if found is not None:
            return found
    return None

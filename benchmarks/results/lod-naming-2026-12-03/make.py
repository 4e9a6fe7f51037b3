"""Rebuild this folder's files (CPU, ~2 min): the two-colour test ball meshed by `tdgen mesh`
with two LODs and a hull collider in each `export.lod_layout`, then the Khronos validator,
Blender 3.4 (import, render, FBX export) and three.js (headless Chromium) on every file.

    python benchmarks/results/lod-naming-2026-12-03/make.py   # from the repository root
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from typer.testing import CliRunner

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's tdgen and test helpers

from test_importers import _ball  # noqa: E402  (the importer tests' ball: red +X, blue −X, green top)

from tdgen.cli import app  # noqa: E402
from tdgen.gaussians import save_ply  # noqa: E402
from tdgen.testing import threejs_render  # noqa: E402
from tdgen.testing.gltf_validator import validate_glb  # noqa: E402


def stacked_vs_single() -> None:
    """three.js's `files` and `nodes` pictures side by side (zoomed), then the pixels that differ."""
    import numpy as np
    from PIL import Image

    a, b = (Image.open(HERE / f"{n}.ball.three.png").convert("RGB") for n in ("files", "nodes"))
    A, B = (np.asarray(im, np.float32) for im in (a, b))
    diff = (np.abs(A - B).max(-1) > 5).astype(np.uint8) * 255
    red = Image.fromarray(np.stack([diff, diff * 0, diff * 0], -1))
    model = np.abs(A / 255 - 128 / 255).max(-1) >= 0.03
    print(f"nodes vs files in three.js: {float((diff[model] > 0).mean()):.3f} of the model's pixels differ")
    sheet = Image.new("RGB", (960, 320))
    for i, im in enumerate((a, b, red)):
        sheet.paste(im.crop((48, 48, 208, 208)).resize((320, 320), Image.NEAREST), (320 * i, 0))
    sheet.save(HERE / "nodes_vs_files.three.png")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tdgen-lod-"))
    ply = work / "ball.ply"
    save_ply(_ball(), ply)
    files, summary = [], {}
    for layout in ("files", "nodes", "msft_lod"):
        out = work / layout / "ball.glb"
        r = CliRunner().invoke(app, [
            "mesh", str(ply), "-o", str(out), "--preset", "draft", "--device", "cpu", "--lods", "2",
            "--set", f"export.lod_layout={layout}", "--set", "mesh.grid=64", "--set", "texture.size=256",
            "--set", "texture.bake_views=10", "--set", "texture.bake_resolution=96",
            "--set", "mesh.triangles=2000", "--set", "export.preview=false",
            "--set", "export.collision=hull", "--set", "export.height=1.5", "--json"])
        assert r.exit_code == 0, r.output
        for glb in sorted(out.parent.glob("*.glb")):
            named = HERE / f"{layout}.{glb.name}"
            shutil.copyfile(glb, named)
            files.append(named)
            issues = validate_glb(named)
            summary[named.name] = {k: issues[k] for k in ("numErrors", "numWarnings", "numInfos", "numHints")}
            summary[named.name]["messages"] = [(m["code"], m["pointer"]) for m in issues["messages"]]
            info: dict = {}
            threejs_render.render_glb(named, HERE / f"{named.stem}.three.png", size=256, info=info)
            summary[named.name]["three_drawn"] = [m["name"] for m in info["meshes"]]
    (HERE / "validator.json").write_text(json.dumps(summary, indent=1) + "\n")
    stacked_vs_single()
    subprocess.run(["blender", "-b", "--factory-startup", "--python", str(ROOT / "benchmarks" / "blender_import.py"),
                    "--", str(HERE / "blender_import.json"), *map(str, files), "--render", str(HERE),
                    "--fbx", str(work)], check=True, capture_output=True)
    shutil.rmtree(work)


main()

"""Render a .glb with three.js (npm `three`, its GLTFLoader) in headless Chromium: the loader and
renderer web games use, as a second real importer beside Blender.

A local HTTP server serves a page, the file and `node_modules/three` (module scripts do not load
from file://); Chromium's --screenshot captures the page once the loader has drawn the model
(`--virtual-time-budget` lets the page's scripts finish first). The camera looks from the front
(glTF +Z) at the model's bounding box with +Y up, on a mid-grey background, lit by an ambient and
a directional light (unlit materials ignore both).

    python -m tdgen.testing.threejs_render ASSET.glb OUT.png [--size 256]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THREE = ROOT / "node_modules" / "three"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><style>html,body{margin:0;background:#808080}</style>
<script type="importmap">{"imports": {"three": "/three/build/three.module.js",
                                      "three/addons/": "/three/examples/jsm/"}}</script></head>
<body><script type="module">
import * as THREE from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
const size = __SIZE__;
const renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
renderer.setPixelRatio(1);
renderer.setSize(size, size);
renderer.setClearColor(0x808080);
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.add(new THREE.AmbientLight(0xffffff, 1.5));
const sun = new THREE.DirectionalLight(0xffffff, 1.5);
sun.position.set(1, 2, 3);
scene.add(sun);
new GLTFLoader().load("/asset.glb", (gltf) => {
  // Colliders are not drawn (engines hide them too): Godot's hints and Unreal's prefix.
  gltf.scene.traverse((o) => {
    if (o.isMesh && (/-(conv)?colonly$/.test(o.name) || o.name.startsWith("UCX_"))) o.visible = false;
  });
  scene.add(gltf.scene);
  const box = new THREE.Box3();
  gltf.scene.traverse((o) => { if (o.isMesh && o.visible) box.expandByObject(o); });
  const centre = box.getCenter(new THREE.Vector3());
  const reach = box.getSize(new THREE.Vector3()).length();
  const camera = new THREE.PerspectiveCamera(35, 1, reach / 100, reach * 10);
  camera.position.set(centre.x, centre.y, centre.z + 1.9 * reach);
  camera.up.set(0, 1, 0);
  camera.lookAt(centre);
  renderer.render(scene, camera);
  // What the loader made of each drawn mesh's material, for tests (render_glb's `info`).
  const meshes = [];
  gltf.scene.traverse((o) => {
    if (!o.isMesh || !o.visible) return;
    const m = o.material;
    meshes.push({ name: o.name, tangent: o.geometry.attributes.tangent !== undefined,
                  normalMap: !!m.normalMap, normalScale: m.normalMap ? m.normalScale.toArray() : null,
                  map: !!m.map, type: m.type });
  });
  const pre = document.createElement("pre");
  pre.id = "info";
  pre.textContent = JSON.stringify({ meshes });
  document.body.appendChild(pre);
  document.title = "rendered";
}, undefined, (err) => { document.title = "error: " + err; });
</script></body></html>
"""


def chromium() -> str | None:
    """Path of a Chromium or Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def available() -> bool:
    return chromium() is not None and (THREE / "build" / "three.module.js").is_file()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test output is not a web server log
        pass


@contextlib.contextmanager
def serve(folder: str | Path):
    """A local HTTP server for `folder` on a free port; yields its base URL."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def capture(url: str, out_png: str | Path | None, width: int, height: int,
            timeout: float = 120.0, budget_ms: int = 20000) -> str:
    """Load `url` in headless Chromium (SwiftShader WebGL), let its scripts run for `budget_ms`
    of virtual time, save a `width`×`height` screenshot to `out_png` if given, and return the
    page's DOM afterwards (its title included)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("needs chromium on PATH (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="tdgen-chromium-") as profile:
        base = [exe, "--headless", "--no-sandbox", "--disable-gpu-sandbox", "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader", "--hide-scrollbars", f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}"]
        if out_png is not None:
            out_png = Path(out_png).resolve()
            proc = subprocess.run(base + [f"--screenshot={out_png}", url], capture_output=True,
                                  text=True, timeout=timeout)
            if proc.returncode != 0 or not out_png.is_file():
                raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-1500:]}")
        proc = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-1500:]}")
        return proc.stdout


def render_glb(glb: str | Path, out_png: str | Path, size: int = 256, timeout: float = 120.0,
               info: dict | None = None) -> Path:
    """Screenshot of `glb` drawn by three.js in headless Chromium → `out_png` (RGB(A) PNG),
    `size` ≥ 256 pixels square (headless Chromium lays out smaller windows wider than asked, so
    the screenshot would crop the canvas). A dict passed as `info` receives what the loader made:
    `meshes`, one {name, tangent, normalMap, normalScale, map, type} per drawn mesh."""
    if size < 256:
        raise ValueError(f"size must be at least 256, got {size}")
    if not available():
        raise RuntimeError("needs chromium on PATH and node_modules/three (npm ci)")
    with tempfile.TemporaryDirectory(prefix="tdgen-three-") as tmp:
        site = Path(tmp)
        (site / "index.html").write_text(PAGE.replace("__SIZE__", str(int(size))))
        shutil.copyfile(glb, site / "asset.glb")
        (site / "three").symlink_to(THREE, target_is_directory=True)
        with serve(site) as url:
            dom = capture(f"{url}/index.html", out_png, size, size, timeout)
        if "<title>rendered</title>" not in dom:
            raise RuntimeError(f"three.js did not draw {glb}: {dom[:300]}")
        if info is not None:
            import html
            import json
            import re

            found = re.search(r'<pre id="info">(.*?)</pre>', dom, re.S)
            info.update(json.loads(html.unescape(found.group(1))) if found else {})
    return Path(out_png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("glb", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    print(render_glb(a.glb, a.out, a.size))


if __name__ == "__main__":
    main()

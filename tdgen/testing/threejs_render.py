"""Render a .glb with three.js (npm `three`, its GLTFLoader) in headless Chromium: the loader and
renderer web games use, as a second real importer beside Blender.

A local HTTP server serves a page, the file and `node_modules/three` (module scripts do not load
from file://); Chromium, driven over its DevTools pipe, screenshots the page once the loader's
callback has drawn the model and set the page title. The camera looks from the front
(glTF +Z) at the model's bounding box with +Y up, on a mid-grey background, lit by an ambient and
a directional light (unlit materials ignore both).

    python -m tdgen.testing.threejs_render ASSET.glb OUT.png [--size 256]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import re
import select
import shutil
import tempfile
import threading
import time
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


class _DevTools:
    """Chromium driven over its DevTools protocol on a pipe (`--remote-debugging-pipe`: commands
    in on fd 3, replies out on fd 4, each a JSON message ending in NUL). Written here rather than
    taken from Playwright or pyppeteer because those download their own browser builds or need a
    websocket client; this drives Debian's Chromium with the standard library alone."""

    def __init__(self, exe: str, args: list[str], timeout: float):
        self.timeout = timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # posix_spawn's dup2 actions put the child's ends on fds 3 and 4 (no preexec_fn: it is
        # unsafe while the HTTP server's thread runs); copies above 10 first, so neither dup2 can
        # overwrite the other's source, and close-on-exec so the copies themselves do not leak.
        r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._log = tempfile.TemporaryFile()
        try:
            self.pid = os.posix_spawn(exe, [exe, *args, "--remote-debugging-pipe"], dict(os.environ),
                                      file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                                    (os.POSIX_SPAWN_DUP2, self._log.fileno(), 2),
                                                    (os.POSIX_SPAWN_DUP2, r, 3),
                                                    (os.POSIX_SPAWN_DUP2, w, 4)])
        finally:
            os.close(r)
            os.close(w)
        self._buf = b""
        self._id = 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and wait for its reply (events in between are dropped)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"chromium: {method} failed: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise RuntimeError(f"chromium did not answer {method} within {self.timeout:.0f} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited during {method}: {self.stderr()}")
            self._buf += chunk

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-1500:]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()


def capture(url: str, out_png: str | Path | None, width: int, height: int,
            timeout: float = 120.0, done: str = "document.readyState === 'complete'") -> str:
    """Load `url` in headless Chromium (SwiftShader WebGL) at a `width`×`height` viewport, wait in
    real time until the JavaScript expression `done` is true (at most `timeout` seconds), save a
    screenshot to `out_png` if given, and return the page's DOM then (its title included).

    Waiting on the page's own signal, not on a virtual-time budget: image decoding runs off the
    page's clock, so a budget can run out before the loader's callback on a busy machine."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("needs chromium on PATH (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="tdgen-chromium-") as profile:
        args = ["--headless", "--no-sandbox", "--disable-gpu-sandbox", "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader", "--hide-scrollbars", f"--window-size={width},{height}",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check"]
        browser = _DevTools(exe, args, timeout)
        try:
            target = browser.call("Target.createTarget", url="about:blank")
            session = browser.call("Target.attachToTarget", targetId=target["targetId"],
                                   flatten=True)["sessionId"]
            browser.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                         deviceScaleFactor=1, mobile=False)
            browser.call("Page.navigate", session, url=url)
            deadline = time.monotonic() + timeout
            while True:
                ready = browser.call("Runtime.evaluate", session, expression=f"!!({done})",
                                     returnByValue=True)
                if ready.get("result", {}).get("value") is True:
                    break
                if time.monotonic() > deadline:
                    break  # the caller judges the DOM (its title says what the page got to)
                time.sleep(0.1)
            if out_png is not None:
                shot = browser.call("Page.captureScreenshot", session, format="png")
                Path(out_png).write_bytes(base64.b64decode(shot["data"]))
            dom = browser.call("Runtime.evaluate", session, returnByValue=True,
                               expression="document.documentElement.outerHTML")
            return dom.get("result", {}).get("value") or ""
        finally:
            browser.close()


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
            dom = capture(f"{url}/index.html", out_png, size, size, timeout,
                          done="document.title === 'rendered' || document.title.startsWith('error')")
        if "<title>rendered</title>" not in dom:
            title = re.search(r"<title>(.*?)</title>", dom, re.S)
            raise RuntimeError(f"three.js did not draw {glb}: "
                               f"{title.group(1) if title else 'no title after ' + str(timeout) + ' s'}")
        if info is not None:
            import html

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

"""Use tdgen from Python: load the model once, make two assets, print where they went.

    python examples/make_asset.py            # needs a GPU and the model (downloaded on first use)
    python examples/make_asset.py --tiny     # the tiny random test model on the CPU (noise, but fast)
"""

import sys
import tempfile
from pathlib import Path

from tdgen.config import resolve_config
from tdgen.guidance import load_model
from tdgen.pipeline import generate
from tdgen.runtime import resolve_device

tiny = "--tiny" in sys.argv
if tiny:
    from tdgen.testing.tiny_model import write_tiny_model

    model_dir = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    cfg = resolve_config("draft", {"model.id": str(model_dir), "stage1.steps": 10, "stage1.resolution": 64,
                                   "stage1.encode_resolution": 64, "texture.size": 128, "texture.bake_resolution": 64})
else:
    cfg = resolve_config("standard", {"export.height": 0.9})

device = resolve_device("cpu" if tiny else "auto")
model = load_model(cfg.model, device)  # loaded once, shared by every asset
for name, prompt in [("chair", "a red wooden chair"), ("lamp", "a brass desk lamp")]:
    result = generate(prompt, cfg, Path("out") / f"{name}.glb", device=device, model=model)
    print(name, {k: str(v) for k, v in result.outputs.items()}, f"{result.timings['total']:.1f} s")

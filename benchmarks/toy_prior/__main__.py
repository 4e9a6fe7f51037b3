"""A trained toy prior: text → 3D end to end against objects whose answer is known (issue 9).

    python -m benchmarks.toy_prior data  --size cpu --out /tmp/toy.npz
    python -m benchmarks.toy_prior train --data /tmp/toy.npz --size cpu --out benchmarks/toy_prior_model
    python -m benchmarks.toy_prior stage1 --model benchmarks/toy_prior_model      # SDS recovery
    python -m benchmarks.toy_prior eval  --model DIR --device cuda                # tdgen make, per object
    python -m benchmarks.toy_prior retexture OBJ SPLAT.ply --model DIR --workdir W   # stage 2 variants
    python -m benchmarks.toy_prior smooth-encoder --model DIR --data /tmp/toy.npz --out DIR2
    python -m benchmarks.toy_prior grad-check --model DIR                         # SDS pixel gradient

`train` also writes the DDIM+CFG sample sheet (`--sheet`) and the training record with the
prompt gap per noise band (`--record`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks.toy_prior.model import SIZES
from benchmarks.toy_prior.objects import OBJECTS


def _objects(arg: str | None) -> list[str]:
    names = [n.strip() for n in (arg or ",".join(OBJECTS)).split(",") if n.strip()]
    bad = [n for n in names if n not in OBJECTS]
    if bad:
        raise SystemExit(f"unknown object(s) {bad}; use {','.join(OBJECTS)}")
    return names


def cmd_data(a) -> None:
    from benchmarks.toy_prior.data import make_data

    t0 = time.perf_counter()
    d = make_data(_objects(a.objects), a.per_object, SIZES[a.size].image, a.seed, a.device)
    d.save(a.out)
    if a.preview:
        from PIL import Image

        rows = [np.concatenate(list(d.images[d.obj == i][:12]), 1) for i in range(len(d.objects))]
        Image.fromarray(np.concatenate(rows, 0)).save(a.preview)
    print(json.dumps({"out": str(a.out), "images": len(d.obj), "size": SIZES[a.size].image,
                      "seconds": round(time.perf_counter() - t0, 1)}))


def cmd_train(a) -> None:
    from benchmarks.toy_prior.data import ToyData
    from benchmarks.toy_prior.evaluate import load_prior, sample_sheet
    from benchmarks.toy_prior.train import train_prior

    data = ToyData.load(a.data)
    size = replace(SIZES[a.size], max_length=a.context_length or SIZES[a.size].max_length,
                   mix_prefix=a.mix_prefix)
    rec = train_prior(data, size, a.out, a.device, seed=a.seed, vae_steps=a.vae_steps,
                      unet_steps=a.unet_steps, batch=a.batch, vae_batch=a.vae_batch, lr=a.lr,
                      max_seconds=a.max_seconds, unet_stop=a.unet_stop,
                      vae_stop=a.vae_stop, t_weight_cap=a.t_weight_cap)
    if a.sheet:
        model = load_prior(a.out, a.device)
        sample_sheet(model, list(data.objects), SIZES[a.size].image, a.sheet, guidance=a.cfg)
        rec["sheet"] = {"path": str(a.sheet), "guidance": a.cfg, "ddim_steps": 50}
    if a.record:
        a.record.write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({k: rec[k] for k in ("seconds", "device_name", "unet_params_m")}))


def cmd_stage1(a) -> None:
    from benchmarks.toy_prior.evaluate import load_prior, stage1_config, stage1_recovery

    model = load_prior(a.model, a.device)
    over = json.loads(a.set) if a.set else {}
    rows = []
    for name in _objects(a.objects):
        for mode in a.modes.split(","):
            cfg = stage1_config(**over)
            img = a.images / f"{name}_{mode}.png" if a.images else None
            r = stage1_recovery(model, name, cfg, seed=a.seed, mode=mode, images=img)
            print(json.dumps(r), flush=True)
            rows.append(r)
    if a.json_out:
        a.json_out.write_text(json.dumps({"config": over, "rows": rows}, indent=1) + "\n")


def cmd_eval(a) -> None:
    from benchmarks.toy_prior.make_eval import run_eval

    rows = run_eval(a.model, _objects(a.objects), a.workdir, a.device,
                    json.loads(a.set) if a.set else {}, a.preset, a.seed)
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1) + "\n")


def cmd_retexture(a) -> None:
    from benchmarks.toy_prior.make_eval import run_retexture

    rows = run_retexture(a.model, a.object, a.splat, a.workdir, a.device, json.loads(a.variants),
                         [int(s) for s in a.seeds.split(",")], a.preset)
    if a.json_out:
        a.json_out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def cmd_smooth_encoder(a) -> None:
    from benchmarks.toy_prior.smooth_encoder import write_smoothed_prior

    rec = write_smoothed_prior(a.model, a.data, a.out, steps=a.steps, batch=a.batch, lr=a.lr,
                               align_weight=a.align_weight, cycle_weight=a.cycle_weight,
                               directions=a.directions, seed=a.seed, pool=a.pool,
                               keep_off_weight=a.keep_off_weight,
                               lowpass_weight=a.lowpass_weight)
    print(json.dumps({k: rec[k] for k in ("seconds", "psnr_db_before", "psnr_db_after")}))


def cmd_distil_tiny(a) -> None:
    from benchmarks.toy_prior.smooth_encoder import write_tiny_encoder

    rec = write_tiny_encoder(a.model, a.data, a.out, steps=a.steps, batch=a.batch, lr=a.lr,
                             align_weight=a.align_weight, seed=a.seed, pool=a.pool)
    print(json.dumps({k: rec[k] for k in ("seconds", "latent_rel_mse")}))


def cmd_grad_check(a) -> None:
    from benchmarks.toy_prior.evaluate import load_prior
    from benchmarks.toy_prior.smooth_encoder import sds_gradient_check

    model = load_prior(a.model, a.device, tiny_encoder=a.tiny_encoder)
    rows = {name: sds_gradient_check(model, name, seed=a.seed,
                                     sheet=a.images / f"grad_{name}.png" if a.images else None)
            for name in _objects(a.objects or "chair")}
    print(json.dumps(rows))
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.toy_prior",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--objects", default=None, help=f"comma-separated of {','.join(OBJECTS)}")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=2)

    p = sub.add_parser("data", parents=[common], help="render the captioned training set")
    p.add_argument("--size", choices=list(SIZES), default="cpu")
    p.add_argument("--per-object", type=int, default=2000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preview", type=Path, default=None, help="PNG of 12 renders per object")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("train", parents=[common], help="train the prior, write the model folder")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--size", choices=list(SIZES), default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--context-length", type=int, default=0,
                   help="text context (tokenizer model_max_length); 0 = SD's 77")
    p.add_argument("--mix-prefix", action="store_true",
                   help="text tower averages each position's prefix into it (model.py)")
    p.add_argument("--t-weight-cap", type=float, default=0.0,
                   help="per-timestep ε-MSE weight min(1/ᾱ_t, cap), mean 1; 0 = uniform")
    p.add_argument("--max-seconds", type=float, default=480.0,
                   help="stop early (recorded) if training would run longer")
    p.add_argument("--vae-stop", type=int, default=None,
                   help="stop the VAE after this many steps of its --vae-steps schedule")
    p.add_argument("--unet-stop", type=int, default=None,
                   help="stop the UNet after this many steps of its --unet-steps schedule")
    p.add_argument("--sheet", type=Path, default=None, help="write the DDIM+CFG sample sheet")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale of the sample sheet")
    p.add_argument("--record", type=Path, default=None, help="write the training record JSON")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("stage1", parents=[common], help="SDS stage 1 from the prior, IoU")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--modes", default="normal", help="normal,flipped,swapped")
    p.add_argument("--set", default=None, help='Stage1Config overrides as JSON, e.g. {"steps": 200}')
    p.add_argument("--images", type=Path, default=None, help="folder for result sheets")
    p.add_argument("--json-out", type=Path, default=None)
    p.set_defaults(fn=cmd_stage1)

    p = sub.add_parser("eval", parents=[common], help="tdgen make per object, then metrics")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--preset", default="standard")
    p.add_argument("--set", default=None, help="extra --set overrides as JSON {key: value}")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--json-out", type=Path, default=None)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("retexture", parents=[common],
                       help="tdgen mesh SPLAT --prompt per stage-2 variant and seed, then metrics")
    p.add_argument("object")
    p.add_argument("splat", type=Path, help="a stage-1 .ply of `eval` (its --workdir)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--preset", default="standard")
    p.add_argument("--variants", default='{"defaults": {}}',
                   help='JSON {name: {key: value}}, e.g. {"bake": {"texture.refine_steps": 0}}')
    p.add_argument("--seeds", default="0", help="refinement seeds, comma-separated")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--json-out", type=Path, default=None)
    p.set_defaults(fn=cmd_retexture)

    p = sub.add_parser("smooth-encoder", parents=[common],
                       help="fine-tune the VAE encoder so its backward follows the decoder")
    p.add_argument("--model", type=Path, required=True, help="prior folder to start from")
    p.add_argument("--data", type=Path, required=True, help="renders from `data`")
    p.add_argument("--out", type=Path, required=True, help="prior folder to write (may be --model)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--pool", type=int, default=2048,
                   help="training inputs with precomputed directions and decoder JVPs")
    p.add_argument("--align-weight", type=float, default=0.1)
    p.add_argument("--keep-off-weight", type=float, default=1.0,
                   help="weight of the keep term on the off-data inputs (soups, noise)")
    p.add_argument("--lowpass-weight", type=float, default=0.0,
                   help="weight of the align cosine taken on 8×8 means (flat colour)")
    p.add_argument("--cycle-weight", type=float, default=0.0)
    p.add_argument("--directions", choices=["random", "sds", "mix"], default="mix")
    p.set_defaults(fn=cmd_smooth_encoder)

    p = sub.add_parser("distil-tiny", parents=[common],
                       help="distil a toy AutoencoderTiny from the prior's VAE encoder")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="AutoencoderTiny folder to write")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=2048)
    p.add_argument("--align-weight", type=float, default=0.2)
    p.set_defaults(fn=cmd_distil_tiny)

    p = sub.add_parser("grad-check", parents=[common],
                       help="cosine of the SDS pixel gradient to the decoded target")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--tiny-encoder", type=Path, default=None,
                   help="AutoencoderTiny folder to use as the SDS encoder (model.sds_encoder=tiny)")
    p.add_argument("--images", type=Path, default=None, help="folder for gradient sheets")
    p.add_argument("--json-out", type=Path, default=None)
    p.set_defaults(fn=cmd_grad_check)

    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    a.fn(a)


if __name__ == "__main__":
    main()

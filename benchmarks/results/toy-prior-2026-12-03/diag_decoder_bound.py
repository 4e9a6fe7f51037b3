"""How well can ANY encoder that keeps the latents align J_Eᵀ v with J_D v?

If the encoder inverts the decoder to first order (J_E J_D = I on the latent space), the
smallest-norm such Jacobian is the decoder's pseudo-inverse, J_E = J_D⁺, and any other one adds a
part orthogonal to J_D's range, which only lowers cos(J_Eᵀ v, J_D v). So cos(J_D⁺ᵀ v, J_D v) is
the best alignment an encoder that keeps the latents can reach (per latent point). Measured on
the chair's 4 renders and the grey blob, for N(0, I) directions and for SDS vectors at t = 0.5;
beside it the actual encoders' cos(J_Eᵀ v, J_D v) and ‖J_E J_D − I‖ / ‖I‖.

    python diag_decoder_bound.py PRIOR_DIR [PRIOR_DIR ...]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402

from benchmarks.toy_prior.data import render_views  # noqa: E402
from benchmarks.toy_prior.evaluate import load_prior, stage1_config  # noqa: E402
from benchmarks.toy_prior.objects import build_object  # noqa: E402
from benchmarks.toy_prior.smooth_encoder import (_math_attention, encoder_moments,  # noqa: E402
                                                  sds_directions)

torch.set_num_threads(1)
cfg = stage1_config()
az = torch.tensor([0.0, 90.0, 180.0, -90.0])
x_ref = render_views(build_object("chair"), torch.zeros(4), az, torch.ones(4, 3), 64,
                     cfg).permute(0, 3, 1, 2)
yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
x_blob = (1 - ((xx ** 2 + yy ** 2) < 0.15).float() * 0.5)[None, None].expand(1, 3, 64, 64)
inputs = torch.cat([x_ref, x_blob]) * 2 - 1  # [5, 3, 64, 64]
out = {}
for k, folder in enumerate(sys.argv[1:]):
    m = load_prior(folder, "cpu")
    vae = m.vae
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, x in enumerate(inputs):
        with torch.no_grad():
            z0 = encoder_moments(vae, x[None])[:, :4]  # [1, 4, 8, 8]
            eye = torch.eye(256).view(256, 4, 8, 8)
            h = 1e-2
            cols = []
            for c in range(0, 256, 64):
                e = eye[c:c + 64]
                cols.append((vae.decode(z0 + h * e).sample - vae.decode(z0 - h * e).sample)
                            .flatten(1) / (2 * h))
            jd = torch.cat(cols).T  # [P, 256]
        xg = x[None].clone().requires_grad_(True)
        with _math_attention():
            mu = encoder_moments(vae, xg)[:, :4].flatten()
            je = torch.stack([torch.autograd.grad(mu[j], xg, retain_graph=True)[0].flatten()
                              for j in range(256)])  # [256, P]
        pinv_t = torch.linalg.pinv(jd).T  # [P, 256]
        v_rand = torch.randn(256, 64, generator=gen)
        v_sds = torch.cat([sds_directions(m, z0, gen).flatten()[:, None] for _ in range(16)], 1)
        r = {"input": "chair" if i < 4 else "blob",
             "cond_JD": float(torch.linalg.cond(jd)),
             "JE_JD_minus_I": float((je @ jd - torch.eye(256)).norm() / 16.0)}
        for name, v in (("random", v_rand), ("sds", v_sds)):
            dv = jd @ v
            cos = lambda a: float(torch.nn.functional.cosine_similarity(a, dv, dim=0).mean())
            r[f"bound_{name}"] = round(cos(pinv_t @ v), 3)
            r[f"encoder_{name}"] = round(cos(je.T @ v), 3)
        rows.append(r)
        print(folder, json.dumps(r), flush=True)
    out[folder] = rows
print(json.dumps(out))

"""The 3D Gaussian parameters, the ball initialisation, and .ply read/write (INRIA 3DGS layout)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tdgen.errors import InputError
from tdgen.io import atomic_write_bytes

C0 = 0.28209479177387814
"""Degree-0 real SH basis constant: rgb = 0.5 + C0 · sh0 (INRIA convention)."""

_SH_REST = {0: 0, 3: 1, 8: 2, 15: 3}  # higher-band coefficients per channel → SH degree


@dataclass
class Gaussians:
    means: Tensor  # [N, 3] world, +Y up
    scales: Tensor  # [N, 3] log std-devs
    quats: Tensor  # [N, 4] w-first (w, x, y, z), not necessarily normalised
    opacities: Tensor  # [N] logits
    sh0: Tensor  # [N, 3] SH DC coefficient
    shN: Tensor  # [N, K, 3] higher SH bands, K in {0, 3, 8, 15}

    @property
    def num(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        return _SH_REST[int(self.shN.shape[1])]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device) -> Gaussians:
        return Gaussians(*(t.to(device) for t in self._fields()))

    def detach(self) -> Gaussians:
        return Gaussians(*(t.detach() for t in self._fields()))

    def rgb(self) -> Tensor:  # [N, 3] view-independent (DC) colour in [0, 1]
        return (0.5 + C0 * self.sh0).clamp(0.0, 1.0)

    def alpha(self) -> Tensor:  # [N] opacity in (0, 1)
        return torch.sigmoid(self.opacities)

    def bulk(self) -> Tensor:  # [N] bool
        """The opaque Gaussians (alpha ≥ 0.5) that make up the object, or all of them when fewer
        than 20 are: what a splat's frame and typical Gaussian size are measured on, so faint haze
        and stray floaters do not set them."""
        opaque = self.alpha() >= 0.5
        return opaque if int(opaque.sum()) >= 20 else torch.ones_like(opaque)

    def covariances(self) -> Tensor:  # [N, 3, 3] world-space Σ = R S Sᵀ Rᵀ
        m = quat_to_rotmat(self.quats) * torch.exp(self.scales)[:, None, :]
        return m @ m.transpose(-1, -2)

    def colors(self) -> Tensor:  # [N, K+1, 3] all SH coefficients, gsplat's `colors` layout
        return torch.cat([self.sh0[:, None, :], self.shN], dim=1)

    def subset(self, sel: Tensor) -> Gaussians:  # sel: [N] bool or [M] indices
        return Gaussians(*(t[sel] for t in self._fields()))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.means, self.scales, self.quats, self.opacities, self.sh0, self.shN)


def normalize_splat(g: Gaussians, crop=None) -> Gaussians:
    """`g` cropped to the box `crop` ((lo, hi) corners in its own coordinates, or None), moved
    and scaled so its opaque bulk is centred at the origin with a radius of about 0.5 — stage 1's
    frame. Captured scenes come in any unit and place; the renderer's near plane and screen-space
    blur are absolute, so stage 2 works in this frame (the export sets size and pivot itself).
    The bulk is the 2–98 % range of the opaque centres, so floaters and haze do not move it."""
    from tdgen.errors import InputError

    keep = torch.isfinite(g.means).all(-1)
    if crop is not None:
        lo = torch.tensor(crop[0], dtype=g.means.dtype, device=g.device)
        hi = torch.tensor(crop[1], dtype=g.means.dtype, device=g.device)
        keep &= ((g.means >= lo) & (g.means <= hi)).all(-1)
        if int(keep.sum()) == 0:
            raise InputError(
                f"--crop {crop[0]}–{crop[1]} holds none of the splat's {g.num} Gaussians; "
                "give a box in the splat's own coordinates"
            )
    g = g.subset(keep) if not bool(keep.all()) else g
    pts = g.means[g.bulk()]
    sample = pts[:: max(1, len(pts) // 200_000)].float()
    if len(sample) >= 2:
        q = torch.quantile(sample, torch.tensor([0.02, 0.98], device=g.device), dim=0)  # [2, 3]
    else:
        q = torch.stack([sample.amin(0), sample.amax(0)])
    centre = 0.5 * (q[0] + q[1])
    radius = float(0.5 * (q[1] - q[0]).norm())
    if not radius > 1e-12:
        radius = max(float((g.means - centre).norm(dim=-1).max()), 1e-12)
    s = 0.5 / radius
    return Gaussians(
        means=(g.means - centre) * s,
        scales=g.scales + math.log(s),
        quats=g.quats,
        opacities=g.opacities,
        sh0=g.sh0,
        shN=g.shN,
    )


def quat_to_rotmat(quats: Tensor) -> Tensor:  # [N, 4] w-first → [N, 3, 3]
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


def init_ball(num_points: int, radius: float, opacity: float,
              generator: torch.Generator) -> Gaussians:
    """`num_points` grey, isotropic Gaussians uniform in a ball (DreamGaussian's text-to-3D start).

    Each scale is the mean distance to the 3 nearest neighbours, as in 3DGS, so the ball starts
    covered without gaps whatever the count. Tensors live on the generator's device.
    """
    device = generator.device
    n = int(num_points)
    dirs = torch.randn(n, 3, generator=generator, device=device)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # r = R·u^(1/3) makes the density uniform in volume, not in radius.
    r = radius * torch.rand(n, 1, generator=generator, device=device) ** (1.0 / 3.0)
    means = dirs * r  # [N, 3]

    from scipy.spatial import cKDTree

    pts = means.double().cpu().numpy()
    k = min(4, n)  # the point itself plus up to 3 neighbours
    if k > 1:
        dist, _ = cKDTree(pts).query(pts, k=k)
        mean_dist = dist[:, 1:].mean(axis=1)
    else:
        mean_dist = np.full(n, radius)
    log_scale = np.log(np.maximum(mean_dist, 1e-7)).astype(np.float32)
    scales = torch.from_numpy(log_scale)[:, None].repeat(1, 3).to(device)

    quats = torch.zeros(n, 4, device=device)
    quats[:, 0] = 1.0
    opacities = torch.full((n,), math.log(opacity / (1.0 - opacity)), device=device)
    return Gaussians(
        means=means,
        scales=scales,
        quats=quats,
        opacities=opacities,
        sh0=torch.zeros(n, 3, device=device),
        shN=torch.zeros(n, 0, 3, device=device),
    )


# ---------------------------------------------------------------------------------------------
# .ply in the INRIA 3DGS layout
#
# We parse PLY ourselves: plyfile is GPL, and trimesh keeps only positions/colours and drops the
# custom per-vertex properties (f_dc_*, f_rest_*, opacity, scale_*, rot_*) that carry a splat.

_LAYOUT_HINT = (
    "expected an INRIA-layout 3DGS .ply (x y z f_dc_0..2 opacity scale_0..2 rot_0..3); "
    "export the splat from a 3DGS trainer or from `tdgen make`"
)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}

_REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def _property_names(sh_rest: int) -> list[str]:
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(3 * sh_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def save_ply(g: Gaussians, path: str | os.PathLike) -> None:
    """Write `g` as a binary little-endian INRIA 3DGS .ply (readable by common splat viewers)."""
    g = g.detach().to("cpu")
    n, k = g.num, int(g.shN.shape[1])
    # INRIA stores f_rest channel-major: all R coefficients, then all G, then all B.
    f_rest = g.shN.transpose(1, 2).reshape(n, 3 * k)  # [N, 3K]
    cols = torch.cat(
        [g.means, torch.zeros(n, 3), g.sh0, f_rest, g.opacities[:, None], g.scales, g.quats], dim=1
    )  # [N, P]
    names = _property_names(k)
    table = np.ascontiguousarray(cols.float().numpy().astype("<f4"))
    records = table.view(np.dtype([(name, "<f4") for name in names]))[:, 0]  # [N] structured
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"element vertex {n}\n" + "".join(f"property float {p}\n" for p in names)
    header += "end_header\n"
    atomic_write_bytes(path, header.encode("ascii") + records.tobytes())


def load_ply(path: str | os.PathLike) -> Gaussians:
    """Read an INRIA-layout 3DGS .ply (binary or ascii, any property order, SH degree 0–3)."""
    path = Path(path)

    def fail(problem: str, fix: str = _LAYOUT_HINT) -> InputError:
        return InputError(f"{path}: {problem}; {fix}")

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail("file not found", "check the path") from None
    except OSError as e:
        raise fail(f"cannot be read ({e.strerror})", "check the path and its permissions") from None

    fmt, elements, body_start = _parse_header(data, fail)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise fail("has no 'vertex' element")
    vi = names.index("vertex")
    _, count, props = elements[vi]
    if count == 0:
        raise fail("holds zero splats", "write a splat with at least one Gaussian")
    if any(kind == "list" for _, kind, _ in props):
        raise fail("has a list property in the vertex element")
    prop_names = [p[0] for p in props]
    twice = sorted({n for n in prop_names if prop_names.count(n) > 1})
    if twice:
        raise fail(f"has the vertex property '{twice[0]}' more than once", "re-export the splat")
    for req in _REQUIRED:
        if req not in prop_names:
            raise fail(f"is missing the vertex property '{req}'")

    if fmt == "ascii":
        columns = _read_ascii(data[body_start:], elements, vi, fail)
    else:
        columns = _read_binary(data, body_start, fmt, elements, vi, fail)

    rest = sorted(
        (int(m.group(1)), name) for name in prop_names if (m := re.fullmatch(r"f_rest_(\d+)", name))
    )
    numbered = [i for i, _ in rest] == list(range(len(rest)))
    if not numbered or len(rest) % 3 or len(rest) // 3 not in _SH_REST:
        raise fail(
            f"has {len(rest)} f_rest_* properties (not 0, 9, 24 or 45 numbered from 0)",
            "export SH degree 0–3 with f_rest_0..f_rest_{3·K−1}",
        )

    def stack(keys: list[str]) -> np.ndarray:
        return np.stack([columns[key] for key in keys], axis=1).astype(np.float32) if keys else (
            np.zeros((count, 0), np.float32)
        )

    arrays = {
        "means": stack(["x", "y", "z"]),
        "sh0": stack(["f_dc_0", "f_dc_1", "f_dc_2"]),
        "f_rest": stack([name for _, name in rest]),
        "opacities": stack(["opacity"])[:, 0],
        "scales": stack(["scale_0", "scale_1", "scale_2"]),
        "quats": stack(["rot_0", "rot_1", "rot_2", "rot_3"]),
    }
    for key, arr in arrays.items():
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr.reshape(count, -1))).any(axis=1).sum())
            raise fail(f"has NaN or infinite values in {key} ({bad} splats)",
                       "re-export the splat or drop those Gaussians")
    k = arrays["f_rest"].shape[1] // 3
    t = {key: torch.from_numpy(np.ascontiguousarray(arr)) for key, arr in arrays.items()}
    return Gaussians(
        means=t["means"],
        scales=t["scales"],
        quats=t["quats"],
        opacities=t["opacities"],
        sh0=t["sh0"],
        shN=t["f_rest"].reshape(count, 3, k).transpose(1, 2).contiguous(),  # [N, K, 3]
    )


def _parse_header(data: bytes, fail):
    """(format, [(element, count, [(prop, kind, dtype)])], offset of the body)."""
    if not data.startswith(b"ply"):
        raise fail("is not a PLY file (no 'ply' magic)")
    end = data.find(b"end_header")
    if end < 0:
        raise fail("has no end_header (truncated or not a PLY file)")
    nl = data.find(b"\n", end)
    if nl < 0:
        raise fail("ends right after its header (truncated)")
    try:
        lines = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise fail("has a non-ASCII header") from None
    fmt = None
    elements: list[tuple[str, int, list]] = []
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1][2].append((words[2], "scalar", _PLY_TYPES[words[1]]))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], "list", (words[2], words[3])))
        else:
            raise fail(f"has an unreadable header line {line.strip()!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise fail(f"has an unknown PLY format {fmt!r}")
    return fmt, elements, nl + 1


def _read_binary(data: bytes, start: int, fmt: str, elements, vi: int,
                 fail) -> dict[str, np.ndarray]:
    order = "<" if fmt == "binary_little_endian" else ">"
    offset = start
    for name, count, props in elements[:vi]:
        # Elements before the vertices can only be skipped when their records have a fixed size.
        if any(kind == "list" for _, kind, _ in props):
            raise fail(f"has a variable-size element '{name}' before the vertices",
                       "put the vertex element first")
        offset += count * sum(np.dtype(order + dt).itemsize for _, _, dt in props)
    _, count, props = elements[vi]
    dtype = np.dtype([(p, order + dt) for p, _, dt in props])
    if len(data) < offset + count * dtype.itemsize:
        raise fail(f"is truncated ({len(data) - offset} bytes of vertex data, "
                   f"{count * dtype.itemsize} expected)", "re-export or re-download the file")
    records = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return {p: records[p].astype(np.float64) for p, _, _ in props}


def _read_ascii(body: bytes, elements, vi: int, fail) -> dict[str, np.ndarray]:
    lines = body.decode("ascii", errors="replace").splitlines()
    skip = sum(count for _, count, _ in elements[:vi])
    _, count, props = elements[vi]
    rows = lines[skip : skip + count]
    try:
        values = np.array(" ".join(rows).split(), dtype=np.float64)
    except ValueError:
        raise fail("has non-numeric vertex values", "re-export the file") from None
    if len(rows) < count or values.size != count * len(props):
        raise fail(f"is truncated or malformed ({values.size} values, {count * len(props)} "
                   "expected)", "re-export or re-download the file")
    table = values.reshape(count, len(props))
    return {p: table[:, i] for i, (p, _, _) in enumerate(props)}

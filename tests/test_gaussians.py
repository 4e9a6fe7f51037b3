"""Gaussian container, ball init, and the INRIA .ply reader/writer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tdgen.errors import InputError
from tdgen.gaussians import C0, Gaussians, init_ball, load_ply, save_ply

INRIA_BASE = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
INRIA_TAIL = ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def random_gaussians(n: int, k: int, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return Gaussians(r(n, 3), r(n, 3), r(n, 4), r(n), r(n, 3), r(n, k, 3))


def write_ply(path, columns: dict[str, np.ndarray], fmt="binary_little_endian", types=None,
              pre_elements: str = "", pre_body: bytes = b"", count=None) -> None:
    """An independent little PLY writer, so the reader is not only tested against save_ply."""
    names = list(columns)
    n = len(next(iter(columns.values()))) if count is None else count
    types = types or {}
    header = f"ply\nformat {fmt} 1.0\ncomment made by a test\n{pre_elements}element vertex {n}\n"
    header += "".join(f"property {types.get(k, 'float')} {k}\n" for k in names) + "end_header\n"
    if fmt == "ascii":
        rows = np.stack([columns[k] for k in names], 1) if names else np.zeros((0, 0))
        body = "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in rows).encode()
    else:
        np_types = {"float": "<f4", "double": "<f8", "uchar": "u1"}
        dtype = np.dtype([(k, np_types[types.get(k, "float")]) for k in names])
        rec = np.zeros(len(next(iter(columns.values()))), dtype)
        for k in names:
            rec[k] = columns[k]
        body = rec.tobytes()
    path.write_bytes(header.encode() + pre_body + body)


def inria_columns(g: Gaussians) -> dict[str, np.ndarray]:
    k = g.shN.shape[1]
    cols = {f"{a}": g.means[:, i].numpy() for i, a in enumerate("xyz")}
    cols.update({f"f_dc_{i}": g.sh0[:, i].numpy() for i in range(3)})
    for c in range(3):  # INRIA: all R coefficients, then G, then B
        for j in range(k):
            cols[f"f_rest_{c * k + j}"] = g.shN[:, j, c].numpy()
    cols["opacity"] = g.opacities.numpy()
    cols.update({f"scale_{i}": g.scales[:, i].numpy() for i in range(3)})
    cols.update({f"rot_{i}": g.quats[:, i].numpy() for i in range(4)})
    return cols


def assert_same(a: Gaussians, b: Gaussians, atol=1e-6) -> None:
    for name in ("means", "scales", "quats", "opacities", "sh0", "shN"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# Container and init


def test_helpers():
    g = random_gaussians(5, 8)
    assert g.num == 5 and g.sh_degree == 2
    g.sh0[0] = 0.0
    torch.testing.assert_close(g.rgb()[0], torch.full((3,), 0.5))
    assert (g.rgb() >= 0).all() and (g.rgb() <= 1).all()
    torch.testing.assert_close(g.alpha(), torch.sigmoid(g.opacities))
    g.quats[1] = torch.tensor([2.0, 0, 0, 0])  # unnormalised identity
    cov = g.covariances()
    assert cov.shape == (5, 3, 3)
    torch.testing.assert_close(cov[1], torch.diag(torch.exp(2 * g.scales[1])))
    torch.testing.assert_close(cov, cov.transpose(1, 2))
    g.means.requires_grad_(True)
    assert not g.detach().means.requires_grad
    assert g.to("cpu").means.device.type == "cpu"


def test_init_ball_statistics():
    gen = torch.Generator().manual_seed(0)
    g = init_ball(4000, 0.5, 0.1, gen)
    assert g.num == 4000 and g.sh_degree == 0 and g.shN.shape == (4000, 0, 3)
    r = g.means.norm(dim=-1)
    assert (r <= 0.5 + 1e-6).all()
    # Uniform in volume: an eighth of the points inside half the radius, half inside r·2^(-1/3).
    assert abs((r < 0.25).float().mean().item() - 0.125) < 0.02
    assert abs((r < 0.5 * 0.5 ** (1 / 3)).float().mean().item() - 0.5) < 0.03
    assert abs(g.means.mean(0)).max() < 0.02
    torch.testing.assert_close(g.alpha(), torch.full((4000,), 0.1))
    torch.testing.assert_close(g.quats, torch.tensor([1.0, 0, 0, 0]).expand(4000, 4))
    assert (g.sh0 == 0).all()
    torch.testing.assert_close(g.rgb(), torch.full((4000, 3), 0.5))
    # Isotropic, with the 3-NN spacing: 4000 points in a 0.52 m³ ball are ~2–5 cm apart.
    assert (g.scales[:, 0] == g.scales[:, 2]).all()
    spacing = torch.exp(g.scales[:, 0]).median().item()
    assert 0.015 < spacing < 0.06
    # Same seed, same ball; another seed, another ball.
    assert torch.equal(init_ball(4000, 0.5, 0.1, torch.Generator().manual_seed(0)).means, g.means)
    assert not torch.equal(init_ball(4000, 0.5, 0.1, torch.Generator().manual_seed(1)).means, g.means)


def test_init_ball_tiny_counts():
    g = init_ball(1, 0.5, 0.3, torch.Generator().manual_seed(0))
    assert g.num == 1 and torch.isfinite(g.scales).all()
    g = init_ball(3, 0.5, 0.3, torch.Generator().manual_seed(0))
    assert torch.isfinite(g.scales).all()


# ---------------------------------------------------------------------------------------------
# .ply


def test_round_trip_degree0(tmp_path):
    g = random_gaussians(37, 0)
    path = tmp_path / "a.ply"
    save_ply(g, path)
    data = path.read_bytes()
    header = data[: data.index(b"end_header\n") + 11].decode()
    props = [line.split()[2] for line in header.splitlines() if line.startswith("property")]
    assert props == INRIA_BASE + INRIA_TAIL
    assert "binary_little_endian" in header and "element vertex 37" in header
    assert all(line.split()[1] == "float" for line in header.splitlines() if line.startswith("property"))
    assert len(data) == len(header) + 37 * len(props) * 4
    assert not list(tmp_path.glob(".tdgen-tmp-*"))  # atomic write left no temp behind
    assert_same(load_ply(path), g)


def test_round_trip_degree3_inria_order(tmp_path):
    g = random_gaussians(11, 15)
    path = tmp_path / "b.ply"
    save_ply(g, path)
    data = path.read_bytes()
    start = data.index(b"end_header\n") + 11
    names = INRIA_BASE + [f"f_rest_{i}" for i in range(45)] + INRIA_TAIL
    rec = np.frombuffer(data[start:], dtype=np.dtype([(k, "<f4") for k in names]))
    # Channel-major: f_rest_1 is the 2nd coefficient of R, f_rest_15 the 1st of G.
    np.testing.assert_array_equal(rec["f_rest_1"], g.shN[:, 1, 0].numpy())
    np.testing.assert_array_equal(rec["f_rest_15"], g.shN[:, 0, 1].numpy())
    np.testing.assert_array_equal(rec["f_rest_44"], g.shN[:, 14, 2].numpy())
    np.testing.assert_array_equal(rec["opacity"], g.opacities.numpy())
    assert_same(load_ply(path), g)


def test_reads_synthetic_degree3_any_order_doubles_extras(tmp_path):
    g = random_gaussians(9, 15, seed=3)
    cols = inria_columns(g)
    cols["red"] = np.arange(9, dtype=np.float64)  # extra properties are ignored
    order = list(cols)[::-1]  # any property order
    cols = {k: cols[k] for k in order}
    types = {k: "double" for k in cols if k.startswith(("f_rest", "scale"))}
    types["red"] = "uchar"
    path = tmp_path / "c.ply"
    write_ply(path, cols, types=types)
    out = load_ply(path)
    assert out.sh_degree == 3 and out.means.dtype == torch.float32
    assert_same(out, g)


def test_reads_ascii_and_skips_leading_elements(tmp_path):
    g = random_gaussians(6, 3, seed=4)
    path = tmp_path / "d.ply"
    write_ply(path, inria_columns(g), fmt="ascii")
    out = load_ply(path)
    assert out.sh_degree == 1
    assert_same(out, g, atol=1e-6)
    # A fixed-size element before the vertices (binary) is skipped by its byte size.
    path2 = tmp_path / "e.ply"
    pre = "element camera 2\nproperty float fx\nproperty double fy\n"
    write_ply(path2, inria_columns(g), pre_elements=pre, pre_body=b"\x00" * (2 * 12))
    assert_same(load_ply(path2), g)


@settings(max_examples=20, deadline=None)
@given(perm_seed=st.integers(0, 10_000), k=st.sampled_from([0, 3, 8, 15]),
       fmt=st.sampled_from(["binary_little_endian", "ascii"]), n=st.integers(1, 5))
def test_reader_property_orders(tmp_path_factory, perm_seed, k, fmt, n):
    g = random_gaussians(n, k, seed=perm_seed)
    cols = inria_columns(g)
    keys = list(cols)
    rng = np.random.default_rng(perm_seed)
    rng.shuffle(keys)
    path = tmp_path_factory.mktemp("prop") / "p.ply"
    write_ply(path, {key: cols[key] for key in keys}, fmt=fmt)
    assert_same(load_ply(path), g)


def _bad_cases(tmp_path):
    g = random_gaussians(4, 0)
    good = inria_columns(g)
    cases = {}

    p = tmp_path / "notply.ply"
    p.write_bytes(b"hello world\n")
    cases["notply"] = (p, "not a PLY")

    p = tmp_path / "noend.ply"
    p.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\n")
    cases["noend"] = (p, "end_header")

    p = tmp_path / "novertex.ply"
    p.write_bytes(b"ply\nformat ascii 1.0\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n")
    cases["novertex"] = (p, "no 'vertex' element")

    p = tmp_path / "missing.ply"
    write_ply(p, {k: v for k, v in good.items() if k != "opacity"})
    cases["missing"] = (p, "'opacity'")

    p = tmp_path / "truncated.ply"
    write_ply(p, good)
    p.write_bytes(p.read_bytes()[:-10])
    cases["truncated"] = (p, "truncated")

    p = tmp_path / "truncated_ascii.ply"
    write_ply(p, good, fmt="ascii")
    p.write_bytes(b"\n".join(p.read_bytes().split(b"\n")[:-3]) + b"\n")
    cases["truncated_ascii"] = (p, "truncated")

    p = tmp_path / "nan.ply"
    bad = dict(good)
    bad["scale_1"] = np.array([0.0, np.nan, 0.0, 0.0], np.float32)
    write_ply(p, bad)
    cases["nan"] = (p, "NaN")

    p = tmp_path / "inf.ply"
    bad = dict(good)
    bad["x"] = np.array([0.0, np.inf, 0.0, 0.0], np.float32)
    write_ply(p, bad)
    cases["inf"] = (p, "infinite")

    p = tmp_path / "empty.ply"
    write_ply(p, {k: v[:0] for k, v in good.items()})
    cases["empty"] = (p, "zero splats")

    p = tmp_path / "rest.ply"
    bad = dict(good)
    for i in range(5):
        bad[f"f_rest_{i}"] = np.zeros(4, np.float32)
    write_ply(p, bad)
    cases["rest"] = (p, "f_rest")

    p = tmp_path / "format.ply"
    p.write_bytes(b"ply\nformat binary_middle_endian 1.0\nelement vertex 0\nend_header\n")
    cases["format"] = (p, "format")

    cases["nofile"] = (tmp_path / "does_not_exist.ply", "not found")
    return cases


CASES = ["notply", "noend", "novertex", "missing", "truncated", "truncated_ascii", "nan", "inf",
         "empty", "rest", "format", "nofile"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_input_error(tmp_path, case):
    path, needle = _bad_cases(tmp_path)[case]
    with pytest.raises(InputError) as exc:
        load_ply(path)
    msg = str(exc.value)
    assert exc.value.exit_code == 2
    assert "\n" not in msg
    assert path.name in msg, msg  # names the file
    assert needle in msg, msg  # names the problem
    assert ";" in msg and len(msg.split(";", 1)[1].strip()) > 10, msg  # and a fix


def test_sh_constant():
    assert math.isclose(C0, 0.5 / math.sqrt(math.pi))

"""The measuring harness: reference objects, metrics that catch broken stages, the quality smoke
(cases A and B end to end) and the speed script's CPU path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import quality, speed
from benchmarks.references import BUILDERS
from tdgen.meshdata import Mesh

CPU = torch.device("cpu")
SMOKE_OBJECTS = quality.SMOKE_OBJECTS


def _signed_volume(mesh: Mesh) -> float:
    tri = mesh.vertices[mesh.faces].astype(np.float64)  # [F, 3, 3]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_reference_is_closed_outward_and_textured(name):
    ref = BUILDERS[name]()
    m = ref.mesh
    # CCW seen from outside ⇔ a positive divergence-theorem volume.
    assert _signed_volume(m) > 0.01  # the chair, lamp and bowl are thin: 0.023–0.027
    assert 0.4 < float(np.linalg.norm(m.vertices, axis=1).max()) < 0.65
    assert np.allclose((m.vertices.min(0) + m.vertices.max(0)) / 2, 0, atol=1e-5)
    assert m.uvs is not None and m.uvs.min() >= 0 and m.uvs.max() <= 1
    colours = np.unique(np.round(ref.texture.reshape(-1, 3), 2), axis=0)
    assert len(colours) >= 2


def test_mug_is_asymmetric():
    from scipy.spatial import cKDTree

    v = BUILDERS["mug"]().mesh.vertices
    # A left/right flip must change the surface, or the benchmark could not see one.
    d, _ = cKDTree(v).query(v * np.array([-1.0, 1.0, 1.0], np.float32))
    assert d.max() > 0.05


def _mirror_x(m: Mesh) -> Mesh:
    # Mirroring reverses winding; swap two corners so faces stay CCW from outside.
    return Mesh(m.vertices * np.array([-1, 1, 1], np.float32), m.faces[:, [0, 2, 1]],
                m.normals * np.array([-1, 1, 1], np.float32), m.uvs)


def test_metrics_pass_a_perfect_copy_and_catch_broken_stages():
    ref = BUILDERS["mug"]()
    cfg = quality.quality_config(True, CPU)
    sizes = quality.Sizes(surface_gaussians=0, metric_points=20_000, metric_resolution=64)
    perfect = quality.measure_mesh(ref.mesh, ref.texture, ref, cfg, sizes, CPU)
    assert perfect["chamfer"] < 0.01 and perfect["fscore"] > 0.95
    assert perfect["mask_iou"] == pytest.approx(1.0) and perfect["normal_agreement"] > 0.95
    assert quality.check_thresholds("A", perfect) == []

    m = ref.mesh
    shifted = Mesh(m.vertices + np.array([0.1, 0, 0], np.float32), m.faces, m.normals, m.uvs)
    failed = quality.check_thresholds("A", quality.measure_mesh(shifted, ref.texture, ref, cfg, sizes, CPU))
    assert any(f.startswith("chamfer") for f in failed) and any(f.startswith("mask_iou") for f in failed)

    grey = np.full_like(ref.texture, 0.5)
    failed = quality.check_thresholds("A", quality.measure_mesh(m, grey, ref, cfg, sizes, CPU))
    assert [f.split()[0] for f in failed] == ["psnr_masked"]

    mirrored = quality.measure_mesh(_mirror_x(m), ref.texture, ref, cfg, sizes, CPU)
    assert quality.check_thresholds("A", mirrored)

    inverted = Mesh(m.vertices, m.faces[:, [0, 2, 1]], -m.normals, m.uvs)
    assert quality.geometry_metrics(inverted, m, 4000)["normal_agreement"] < -0.9


def test_oracle_guidance_is_a_guidance_with_a_known_minimum():
    from tdgen.render import orbit_cameras

    ref = BUILDERS["table"]()
    oracle = quality.OracleGuidance(ref, CPU)
    cams = orbit_cameras([10.0, -20.0], [0.0, 135.0], 2.5, 49.1, 32, 32)
    bgs = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    target = oracle.target(cams, bgs)  # [2, 3, 32, 32]
    assert target.shape == (2, 3, 32, 32)
    # Same background behind the object as the render it is compared with.
    assert torch.allclose(target[0, :, 0, 0], bgs[0]) and torch.allclose(target[1, :, 0, 0], bgs[1])
    assert float(oracle.loss(target.clone(), cams, bgs, 0.5)) == pytest.approx(0.0, abs=1e-7)
    images = torch.full_like(target, 0.5, requires_grad=True)
    loss = oracle.loss(images, cams, bgs, 0.5)
    loss.backward()
    assert loss.ndim == 0 and float(loss.detach()) > 0.05 and images.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# End to end (the CI quality smoke): the real stages, CPU-sized


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    torch.set_num_threads(2)
    cfg = quality.quality_config(True, CPU)
    refs = [BUILDERS[name]() for name in SMOKE_OBJECTS]
    workdir = tmp_path_factory.mktemp("quality")
    rows = quality.run(refs, ["A", "B"], cfg, quality.SMOKE_SIZES, CPU, workdir, smoke=True)
    return {(r["case"], r["object"]): r for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOKE_OBJECTS)
def test_quality_smoke_case_a_stage2_alone(smoke_rows, name):
    row = smoke_rows[("A", name)]
    assert "error" not in row, row.get("error")
    assert row["passed"], row["failed"]
    assert row["glb_height"] == pytest.approx(1.0, rel=1e-3)  # export.height, read back
    assert row["pieces"] == 1 and row["closed"]  # one closed surface, flat surfels and all


@pytest.mark.slow
def test_quality_smoke_fails_on_the_old_density_surface(tmp_path):
    """The same flat-surfel mug meshed by DreamGaussian's density iso-surface (the surface before
    depth fusion) misses the case-A thresholds: the smoke would catch a return to it."""
    torch.set_num_threads(2)
    cfg = quality.quality_config(True, CPU, sets={"mesh.method": "density"})
    rows = quality.run([BUILDERS["mug"]()], ["A"], cfg, quality.SMOKE_SIZES, CPU, tmp_path, smoke=True)
    failed = {f.split()[0] for f in rows[0]["failed"]}
    assert {"fscore", "normal_agreement"} <= failed, rows[0]["failed"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOKE_OBJECTS)
def test_quality_smoke_case_b_oracle_pipeline(smoke_rows, name):
    row = smoke_rows[("B", name)]
    assert "error" not in row, row.get("error")
    assert row["passed"], row["failed"]
    counts = row["counts"]
    assert counts["loss_last"] < 0.6 * counts["loss_first"]  # stage 1 learned from the oracle
    assert counts["oracle_calls"] == quality.quality_config(True, CPU).stage1.steps


@pytest.mark.slow
def test_quality_smoke_catches_a_broken_bake_and_a_moved_or_stretched_mesh(smoke_rows):
    from pathlib import Path

    ref = BUILDERS["mug"]()
    cfg = quality.quality_config(True, CPU)
    row = smoke_rows[("A", "mug")]
    pred, tex = quality.read_glb_in_reference_frame(Path(row["glb"]), ref, cfg.export.height)
    sizes = quality.Sizes(0, 20_000, 64)
    grey = quality.measure_mesh(pred, np.full_like(tex, 0.5), ref, cfg, sizes, CPU)
    assert any(f.startswith("psnr_masked") for f in quality.check_thresholds("A", grey))
    shift = np.array([0.1, 0, 0], np.float32) * np.ptp(ref.mesh.vertices[:, 0])
    moved = Mesh(pred.vertices + shift, pred.faces, pred.normals, pred.uvs)
    assert quality.check_thresholds("A", quality.measure_mesh(moved, tex, ref, cfg, sizes, CPU), "mug")

    # A shift before export is undone by the export's pivot; a stretch is not.
    sphere = BUILDERS["sphere"]()
    row = smoke_rows[("A", "sphere")]
    pred, tex = quality.read_glb_in_reference_frame(Path(row["glb"]), sphere, cfg.export.height)
    wide = Mesh(pred.vertices * np.array([1.1, 1, 1], np.float32), pred.faces, pred.normals, pred.uvs)
    failed = quality.check_thresholds("A", quality.measure_mesh(wide, tex, sphere, cfg, sizes, CPU), "sphere")
    assert {f.split()[0] for f in failed} >= {"chamfer", "mask_iou"}


# ---------------------------------------------------------------------------------------------
# Speed script, CPU path with the tiny model


def test_speed_sds_only_tiny_cpu_writes_json(tmp_path, capsys):
    out = tmp_path / "sds.json"
    rc = speed.main(["--device", "cpu", "--tiny", "--sds-only", "--sds-steps", "1",
                     "--sds-resolution", "32", "--json-out", str(out), "--json"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report  # --json prints the same object
    rows = report["sds"]["rows"]
    assert [r["name"] for r in rows] == [v["name"] for v in speed.sds_variants(CPU, 32)]
    assert all(r["ms_per_step"] > 0 and r["grad_finite"] for r in rows)
    assert {r["encoder"] for r in rows} == {"vae", "tiny"}
    assert report["environment"]["torch"] == torch.__version__
    assert report["cold_start"]["model_build_s"] > 0


def test_speed_sds_rows_filter_and_refine_only(tmp_path):
    out = tmp_path / "sds.json"
    assert speed.main(["--device", "cpu", "--tiny", "--sds-only", "--sds-steps", "1",
                       "--sds-resolution", "32", "--sds-rows", "image-space",
                       "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["sds"]["rows"]
    assert rows and all("image-space" in r["name"] and r["space"] == "image" for r in rows)
    assert {r["decoder"] for r in rows} == {"eager", "compiled"}  # on the CPU both run eagerly
    out = tmp_path / "refine.json"
    assert speed.main(["--device", "cpu", "--tiny", "--refine-only", "--json-out", str(out)]) == 0
    refine = json.loads(out.read_text())["refine"]
    assert [r["ddim_steps"] for r in refine] == [50, 25]
    assert all(r["refine_steps"] == 3 and r["seconds"] > 0 for r in refine)


@pytest.mark.slow
def test_speed_pipeline_tiny_cpu_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    rc = speed.main(["--device", "cpu", "--tiny", "--presets", "draft", "--runs", "1",
                     "--json-out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (preset,) = report["presets"]
    for stage in ("stage1", "mesh", "unwrap", "bake", "export", "total"):
        assert preset["stage_seconds"][stage] > 0, stage
    assert any(k.startswith("mesh.") for k in preset["stage_seconds"]), "no mesh sub-stages"
    assert preset["sds_steps_per_s"] > 0
    assert preset["batch"]["assets_per_hour"] > 0
    assert preset["runs"][0]["counts"]["stage1_steps"] == speed.TINY["stage1.steps"]
    assert report["cold_start"]["total_s"] >= report["cold_start"]["model_build_s"]


def test_normalmap_benchmark_map_beats_the_low_poly_alone():
    """benchmarks/normalmap.py at a small size: with its map the decimated rock renders closer to
    the high-poly (PSNR, normal consistency) than without."""
    from benchmarks import normalmap

    rock = normalmap.shapes()["rock"]
    rec, _ = normalmap.measure("rock", rock, 600, 256)
    low, mapped = rec["low"], rec["low+normalmap"]
    assert mapped["psnr"] > low["psnr"] + 2.0, rec
    assert mapped["normal_consistency"] > low["normal_consistency"], rec
    assert mapped["normal_error_deg"] < 0.5 * low["normal_error_deg"], rec


def test_profile_trace_analysis_counts_gpu_busy_time_once(tmp_path):
    """profile_stage1's GPU-busy figure is the union of kernel intervals (overlaps and memcpys
    counted once, events outside the profiled steps ignored), and host waits are summed per step."""
    import gzip

    from benchmarks import profile_stage1

    events = [
        {"ph": "X", "name": "ProfilerStep#10", "ts": 0, "dur": 100},
        {"ph": "X", "name": "ProfilerStep#11", "ts": 100, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 10, "dur": 30},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 20, "dur": 30},  # overlaps a: 10–50
        {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 120, "dur": 20},
        {"ph": "X", "cat": "kernel", "name": "late", "ts": 500, "dur": 50},  # after the window
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 60, "dur": 8},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 5, "dur": 2},
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = profile_stage1.analyse_trace(path, steps=2)
    assert out["wall_ms_per_step"] == pytest.approx(0.1)
    assert out["gpu_busy_ms_per_step"] == pytest.approx(0.03)  # (40 + 20) µs over 2 steps
    assert out["gpu_busy_share"] == pytest.approx(0.3)
    assert out["host_waits_ms_per_step"] == {"cudaStreamSynchronize": pytest.approx(0.004)}
    assert out["kernel_launches_per_step"] == 0.5

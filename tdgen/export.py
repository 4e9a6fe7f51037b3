"""Stage 4: the textured mesh as a binary glTF (.glb), plus optional LODs.

Written field by field with pygltflib (trimesh's exporter decides materials, names and flips for
us). Axes are kept as the library world has them: +Y up, front toward +Z, which is glTF's own
convention, so the one node carries no transform at all.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tdgen import __version__
from tdgen.config import ExportConfig
from tdgen.errors import GenerationError
from tdgen.io import atomic_write_bytes
from tdgen.meshdata import Mesh

# glTF enums (spec §5): component types, buffer-view targets, sampler filters and wraps.
_FLOAT, _UINT16, _UINT32 = 5126, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _REPEAT = 9729, 9987, 10497
_UNLIT = "KHR_materials_unlit"


@dataclass
class ExportResult:
    paths: list[Path]
    """The main .glb first, then NAME_lod1.glb, … ."""
    triangles: int
    """Triangles of the main .glb."""
    vertices: int
    """Vertices of the main .glb (seam vertices counted once per chart)."""
    texture_size: int
    """Edge of the embedded square base-colour texture, texels."""
    height: float
    """Height of the asset (y extent), metres."""
    collision_hulls: int = 0
    """Convex collision pieces written into the main .glb."""


# ---------------------------------------------------------------------------------------------
# Inputs


def texture_to_uint8(texture) -> np.ndarray:
    """`[S, S, 3]` float in [0, 1] (tensor or array) or uint8 → contiguous uint8 `[S, S, 3]`."""
    if hasattr(texture, "detach"):  # a torch tensor, without importing torch here
        texture = texture.detach().cpu().numpy()
    tex = np.asarray(texture)
    if tex.ndim != 3 or tex.shape[2] != 3 or tex.shape[0] != tex.shape[1]:
        raise ValueError(f"texture must be [S, S, 3], got {tuple(tex.shape)}")
    size = tex.shape[0]
    if size < 1 or size & (size - 1):
        raise ValueError(f"texture size must be a power of two, got {size}")
    if tex.dtype != np.uint8:
        tex = np.round(np.clip(np.nan_to_num(tex.astype(np.float32)), 0.0, 1.0) * 255.0)
    return np.ascontiguousarray(tex.astype(np.uint8))


def encode_png(tex: np.ndarray) -> bytes:  # [S, S, 3] uint8, row 0 = top
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tex, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def place_for_export(vertices: np.ndarray, height: float) -> tuple[np.ndarray, float]:
    """Offset and uniform scale putting the pivot at the bottom centre and the y extent at `height`.

    Returns (offset [3], scale): exported = (v − offset) · scale. x, z of the bounding-box centre go
    to 0 and the lowest point to y = 0, so the asset stands on the ground at its origin.
    """
    v = vertices.astype(np.float64)
    lo, hi = v.min(0), v.max(0)
    extent = hi[1] - lo[1]
    if not np.isfinite(extent) or extent <= 0:
        raise GenerationError(
            "the mesh has no height (all vertices at one y) so it cannot be scaled to "
            "export.height; check the splat, or lower mesh.threshold"
        )
    offset = np.array([(lo[0] + hi[0]) / 2, lo[1], (lo[2] + hi[2]) / 2])
    return offset, float(height) / float(extent)


# ---------------------------------------------------------------------------------------------
# LODs


def decimate_keep_uvs(mesh: Mesh, target: int) -> Mesh:
    """`mesh` decimated to about `target` triangles, every kept vertex carrying its own attributes.

    UV seams are split vertices, i.e. open borders of the triangle soup; they are held fixed
    (`preserve_border`) so the two sides of a seam cannot drift apart and open cracks. Each edge
    collapse is replayed on the original vertices (the survivor keeps its position, normal and
    uv rather than the quadric optimum), so every uv stays exactly where the texture expects it.
    """
    import fast_simplification

    faces = mesh.faces.astype(np.int64)
    if len(faces) <= target:
        return mesh
    _, _, collapses = fast_simplification.simplify(
        mesh.vertices.astype(np.float64),
        faces,
        target_count=int(target),
        return_collapses=True,
        preserve_border=True,
    )
    # collapses[k] = [i0, i1]: i1 merged into i0. Follow the chain to each vertex's survivor.
    parent = np.arange(mesh.num_vertices, dtype=np.int64)
    for i0, i1 in np.asarray(collapses, dtype=np.int64).reshape(-1, 2):
        parent[i1] = i0
    root = parent.copy()
    while True:  # pointer jumping: log(chain length) passes
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    f = root[faces]  # [F, 3]
    keep = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])
    f = f[keep]
    _, first = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
    f = f[np.sort(first)]
    used, f = np.unique(f, return_inverse=True)
    f = f.reshape(-1, 3)
    return Mesh(
        vertices=mesh.vertices[used],
        faces=f.astype(np.int64),
        normals=mesh.normals[used],
        uvs=None if mesh.uvs is None else mesh.uvs[used],
    )


# ---------------------------------------------------------------------------------------------
# glTF assembly


def _unit_normals(n: np.ndarray) -> np.ndarray:
    n = np.nan_to_num(n.astype(np.float64))
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(length > 1e-12, n / np.maximum(length, 1e-12), np.array([0.0, 1.0, 0.0]))
    return n.astype(np.float32)


def collision_node_name(name: str, index: int, convention: str) -> str:
    """The node name an engine's importer turns into a convex collider (see
    `ExportConfig.collision_names`): Godot strips the `-convcolonly` hint and makes a
    StaticBody3D with a convex shape, hiding the mesh; Unreal pairs `UCX_NAME_NN` with NAME."""
    if convention == "unreal":
        return f"UCX_{name}_{index:02d}"
    return f"{name}_col{index:02d}-convcolonly"


def build_glb(mesh: Mesh, png: bytes, name: str, unlit: bool,
              collision: list[tuple[np.ndarray, np.ndarray]] = (),
              collision_names: str = "godot", normal_png: bytes | None = None) -> bytes:
    """One scene → one node (no transform) → one mesh with one textured primitive, as .glb bytes;
    each `collision` piece (vertices [V, 3], faces [F, 3], already placed) one more root node
    with an untextured, position-only mesh named by `collision_node_name`. With `normal_png` (a
    tangent-space normal map, `normalmap.bake_normal_map`) the material's `normalTexture` and the
    primitive's `TANGENT` (`normalmap.vertex_tangents`, the frame the map was baked in)."""
    import pygltflib as gl

    normals = _unit_normals(mesh.normals)  # [V, 3]
    uvs = np.ascontiguousarray(mesh.uvs, dtype=np.float32)  # [V, 2]
    n_vert = len(mesh.vertices)

    blob = bytearray()
    views: list[gl.BufferView] = []

    def add_view(data: bytes, target: int | None) -> int:
        views.append(
            gl.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data), target=target)
        )
        blob.extend(data)
        blob.extend(b"\x00" * (-len(blob) % 4))  # every view starts 4-byte aligned
        return len(views) - 1

    accessors: list[gl.Accessor] = []

    def add_positions(v: np.ndarray) -> int:  # [V, 3] → accessor index (with the bounds glTF needs)
        v = np.ascontiguousarray(v, dtype=np.float32)
        accessors.append(gl.Accessor(
            bufferView=add_view(v.tobytes(), _ARRAY_BUFFER), componentType=_FLOAT, count=len(v),
            type="VEC3", min=[float(x) for x in v.min(0)], max=[float(x) for x in v.max(0)]))
        return len(accessors) - 1

    def add_indices(faces: np.ndarray, n_vertices: int) -> int:  # [F, 3] → accessor index
        # 65535 is the primitive-restart value, so uint16 holds indices 0..65534 only.
        dtype, ctype = (np.uint16, _UINT16) if n_vertices < 65535 else (np.uint32, _UINT32)
        idx = np.ascontiguousarray(faces, dtype=dtype).reshape(-1)  # [3F]
        accessors.append(gl.Accessor(
            bufferView=add_view(idx.tobytes(), _ELEMENT_ARRAY_BUFFER), componentType=ctype,
            count=int(idx.size), type="SCALAR"))
        return len(accessors) - 1

    add_positions(mesh.vertices)  # 0
    accessors.append(gl.Accessor(  # 1
        bufferView=add_view(normals.tobytes(), _ARRAY_BUFFER), componentType=_FLOAT,
        count=n_vert, type="VEC3"))
    accessors.append(gl.Accessor(  # 2
        bufferView=add_view(uvs.tobytes(), _ARRAY_BUFFER), componentType=_FLOAT,
        count=n_vert, type="VEC2"))
    add_indices(mesh.faces, n_vert)  # 3
    tangent = None
    if normal_png is not None:
        from tdgen.normalmap import vertex_tangents

        # Exported, not left to the client: three.js does not compute MikkTSpace without it
        # (it falls back to screen-space derivatives), and the map is baked in exactly this frame.
        t = np.ascontiguousarray(vertex_tangents(mesh), dtype=np.float32)  # [V, 4]
        accessors.append(gl.Accessor(
            bufferView=add_view(t.tobytes(), _ARRAY_BUFFER), componentType=_FLOAT,
            count=n_vert, type="VEC4"))
        tangent = len(accessors) - 1
    image_view = add_view(png, None)
    normal_view = add_view(normal_png, None) if normal_png is not None else None

    extra_nodes, extra_meshes = [], []
    for k, (cv, cf) in enumerate(collision):
        node_name = collision_node_name(name, k, collision_names)
        primitive_k = gl.Primitive(attributes=gl.Attributes(POSITION=add_positions(cv)),
                                   indices=add_indices(cf, len(cv)), mode=gl.TRIANGLES)
        extra_meshes.append(gl.Mesh(name=node_name, primitives=[primitive_k]))
        extra_nodes.append(gl.Node(name=node_name, mesh=1 + k))

    material = gl.Material(
        name=f"{name}_material",
        pbrMetallicRoughness=gl.PbrMetallicRoughness(
            baseColorTexture=gl.TextureInfo(index=0, texCoord=0),
            metallicFactor=0.0,
            roughnessFactor=0.9,
        ),
        normalTexture=None if normal_png is None else gl.NormalMaterialTexture(index=1, texCoord=0),
        alphaMode="OPAQUE",
        doubleSided=False,
        # Lighting is baked into the texture; unlit tells engines not to light it a second time.
        extensions={_UNLIT: {}} if unlit else {},
    )
    primitive = gl.Primitive(
        attributes=gl.Attributes(POSITION=0, NORMAL=1, TEXCOORD_0=2, TANGENT=tangent),
        indices=3,
        material=0,
        mode=gl.TRIANGLES,
    )
    gltf = gl.GLTF2(
        asset=gl.Asset(generator=f"tdgen {__version__}", version="2.0"),
        extensionsUsed=[_UNLIT] if unlit else [],
        scene=0,
        scenes=[gl.Scene(name=name, nodes=list(range(1 + len(extra_nodes))))],
        nodes=[gl.Node(name=name, mesh=0), *extra_nodes],  # identity: no matrix, no TRS
        meshes=[gl.Mesh(name=name, primitives=[primitive]), *extra_meshes],
        materials=[material],
        textures=[gl.Texture(name=f"{name}_basecolor", sampler=0, source=0)]
        + ([gl.Texture(name=f"{name}_normal", sampler=0, source=1)] if normal_view is not None else []),
        samplers=[
            gl.Sampler(
                magFilter=_LINEAR, minFilter=_LINEAR_MIPMAP_LINEAR, wrapS=_REPEAT, wrapT=_REPEAT
            )
        ],
        images=[gl.Image(name=f"{name}_basecolor", mimeType="image/png", bufferView=image_view)]
        + ([gl.Image(name=f"{name}_normal", mimeType="image/png", bufferView=normal_view)]
           if normal_view is not None else []),
        accessors=accessors,
        bufferViews=views,
        buffers=[gl.Buffer(byteLength=len(blob))],
    )
    gltf.set_binary_blob(bytes(blob))
    out = gltf.save_to_bytes()
    return b"".join(out) if isinstance(out, (list, tuple)) else bytes(out)


def lod_path(path: Path, level: int) -> Path:
    """`NAME.glb` → `NAME_lod{level}.glb` beside it."""
    return path.with_name(f"{path.stem}_lod{level}{path.suffix}")


def export_glb(mesh: Mesh, texture, cfg: ExportConfig, path: str | os.PathLike,
               lods: list[tuple] | None = None,
               collision: list[tuple[np.ndarray, np.ndarray]] = (),
               normal_map=None) -> ExportResult:
    """Write `mesh` with `texture` [S, S, 3] (float in [0, 1] or uint8, row 0 = top) to `path`,
    and `normal_map` [S', S', 3] (tangent-space, same layout) as its normal texture if given.

    The asset is re-centred (pivot at the bottom centre) and uniformly scaled to `cfg.height`
    metres; `cfg.lods` extra files follow: `lods` (mesh, texture[, normal map]) made by the caller (the
    pipeline re-unwraps each level), or else each level decimated from the previous keeping its
    UVs and the same texture (which stops halving once the seams dominate). Every LOD is placed
    exactly like the main mesh, so they line up. `collision` pieces (`collision.collision_shapes`,
    in the mesh's frame) go into the main file only, placed the same way. Every file is built in
    memory first and then
    written atomically, so a failure leaves no partial output.
    """
    path = Path(path)
    if mesh.uvs is None:
        raise ValueError("export_glb needs a mesh with uvs; call unwrap_mesh first")
    if mesh.num_faces == 0:
        raise GenerationError("the mesh is empty; lower mesh.threshold so a surface is found")
    tex = texture_to_uint8(texture)
    png = encode_png(tex)

    offset, scale = place_for_export(mesh.vertices, cfg.height)

    def place(v: np.ndarray) -> np.ndarray:  # [V, 3] in the mesh's frame → exported
        return ((v.astype(np.float64) - offset) * scale).astype(np.float32)

    def placed(m: Mesh) -> Mesh:
        return Mesh(vertices=place(m.vertices), faces=m.faces, normals=m.normals, uvs=m.uvs)

    unlit = cfg.shading == "unlit"
    pieces = [(place(v), f) for v, f in collision]
    normal_png = None if normal_map is None else encode_png(texture_to_uint8(normal_map))
    outputs: list[tuple[Path, bytes]] = [(path, build_glb(placed(mesh), png, path.stem, unlit,
                                                          pieces, cfg.collision_names, normal_png))]
    if lods is not None:
        if len(lods) != cfg.lods:
            raise ValueError(f"export.lods is {cfg.lods} but {len(lods)} LOD meshes were given")
        for level, (lod, lod_tex, *lod_normal) in enumerate(lods, start=1):
            if lod.uvs is None:
                raise ValueError("every LOD mesh needs uvs")
            p = lod_path(path, level)
            lod_npng = (encode_png(texture_to_uint8(lod_normal[0]))
                        if lod_normal and lod_normal[0] is not None else None)
            outputs.append((p, build_glb(placed(lod), encode_png(texture_to_uint8(lod_tex)), p.stem,
                                         unlit, normal_png=lod_npng)))
    else:
        # Decimating keeps the uvs but not the surface the map was baked against: no normal map.
        lod = mesh
        for level in range(1, cfg.lods + 1):
            lod = decimate_keep_uvs(lod, max(1, lod.num_faces // 2))
            p = lod_path(path, level)
            outputs.append((p, build_glb(placed(lod), png, p.stem, unlit)))

    for p, data in outputs:
        atomic_write_bytes(p, data)
    return ExportResult(
        paths=[p for p, _ in outputs],
        triangles=mesh.num_faces,
        vertices=mesh.num_vertices,
        texture_size=int(tex.shape[0]),
        height=float(cfg.height),
        collision_hulls=len(pieces),
    )

"""Stage 4: the textured mesh as a binary glTF (.glb), plus optional LODs (laid out by `tdgen.lods`).

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
from tdgen.lods import lod_node_name, lod_nodes, lod_path
from tdgen.meshdata import Mesh

# glTF enums (spec §5): component types, buffer-view targets, sampler filters and wraps.
_FLOAT, _UINT16, _UINT32 = 5126, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _REPEAT = 9729, 9987, 10497
_UNLIT = "KHR_materials_unlit"


@dataclass
class ExportResult:
    paths: list[Path]
    """The main .glb first, then NAME_lod1.glb, … (`files` layout; the others write one file)."""
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


class _Glb:
    """The buffers, accessors, meshes, materials, textures and images of one .glb, filled level by
    level and collider by collider; `to_bytes` adds the node graph (`lods.lod_nodes`)."""

    def __init__(self):
        import pygltflib as gl

        self.gl = gl
        self.blob = bytearray()
        self.views: list = []
        self.accessors: list = []
        self.meshes: list = []
        self.materials: list = []
        self.textures: list = []
        self.images: list = []

    def view(self, data: bytes, target: int | None) -> int:
        self.views.append(self.gl.BufferView(buffer=0, byteOffset=len(self.blob),
                                             byteLength=len(data), target=target))
        self.blob.extend(data)
        self.blob.extend(b"\x00" * (-len(self.blob) % 4))  # every view starts 4-byte aligned
        return len(self.views) - 1

    def attribute(self, a: np.ndarray, kind: str, bounds: bool = False) -> int:  # [V, C] float32
        a = np.ascontiguousarray(a, dtype=np.float32)
        extra = dict(min=[float(x) for x in a.min(0)], max=[float(x) for x in a.max(0)]) if bounds else {}
        self.accessors.append(self.gl.Accessor(bufferView=self.view(a.tobytes(), _ARRAY_BUFFER),
                                               componentType=_FLOAT, count=len(a), type=kind, **extra))
        return len(self.accessors) - 1

    def indices(self, faces: np.ndarray, n_vertices: int) -> int:  # [F, 3] → accessor index
        # 65535 is the primitive-restart value, so uint16 holds indices 0..65534 only.
        dtype, ctype = (np.uint16, _UINT16) if n_vertices < 65535 else (np.uint32, _UINT32)
        idx = np.ascontiguousarray(faces, dtype=dtype).reshape(-1)  # [3F]
        self.accessors.append(self.gl.Accessor(
            bufferView=self.view(idx.tobytes(), _ELEMENT_ARRAY_BUFFER), componentType=ctype,
            count=int(idx.size), type="SCALAR"))
        return len(self.accessors) - 1

    def texture(self, png: bytes, name: str) -> int:
        self.images.append(self.gl.Image(name=name, mimeType="image/png", bufferView=self.view(png, None)))
        self.textures.append(self.gl.Texture(name=name, sampler=0, source=len(self.images) - 1))
        return len(self.textures) - 1

    def textured_mesh(self, mesh: Mesh, png: bytes, name: str, unlit: bool,
                      normal_png: bytes | None = None) -> int:
        """One mesh with one primitive and its own material and textures; the mesh's index."""
        gl = self.gl
        position = self.attribute(mesh.vertices, "VEC3", bounds=True)
        normal = self.attribute(_unit_normals(mesh.normals), "VEC3")
        uv = self.attribute(mesh.uvs, "VEC2")
        index = self.indices(mesh.faces, len(mesh.vertices))
        tangent = None
        if normal_png is not None:
            from tdgen.normalmap import vertex_tangents

            # Exported, not left to the client: three.js does not compute MikkTSpace without it
            # (it falls back to screen-space derivatives), and the map is baked in exactly this frame.
            tangent = self.attribute(vertex_tangents(mesh), "VEC4")
        base = self.texture(png, f"{name}_basecolor")
        normal_tex = self.texture(normal_png, f"{name}_normal") if normal_png is not None else None
        self.materials.append(gl.Material(
            name=f"{name}_material",
            pbrMetallicRoughness=gl.PbrMetallicRoughness(
                baseColorTexture=gl.TextureInfo(index=base, texCoord=0),
                metallicFactor=0.0,
                roughnessFactor=0.9,
            ),
            normalTexture=None if normal_tex is None else gl.NormalMaterialTexture(index=normal_tex, texCoord=0),
            alphaMode="OPAQUE",
            doubleSided=False,
            # Lighting is baked into the texture; unlit tells engines not to light it a second time.
            extensions={_UNLIT: {}} if unlit else {},
        ))
        primitive = gl.Primitive(
            attributes=gl.Attributes(POSITION=position, NORMAL=normal, TEXCOORD_0=uv, TANGENT=tangent),
            indices=index, material=len(self.materials) - 1, mode=gl.TRIANGLES)
        self.meshes.append(gl.Mesh(name=name, primitives=[primitive]))
        return len(self.meshes) - 1

    def collider(self, v: np.ndarray, f: np.ndarray, name: str) -> int:
        """An untextured, position-only mesh (a convex collision piece); the mesh's index."""
        gl = self.gl
        primitive = gl.Primitive(attributes=gl.Attributes(POSITION=self.attribute(v, "VEC3", bounds=True)),
                                 indices=self.indices(f, len(v)), mode=gl.TRIANGLES)
        self.meshes.append(gl.Mesh(name=name, primitives=[primitive]))
        return len(self.meshes) - 1

    def to_bytes(self, scene_name: str, nodes: list, roots: list[int], used: list[str]) -> bytes:
        gl = self.gl
        gltf = gl.GLTF2(
            asset=gl.Asset(generator=f"tdgen {__version__}", version="2.0"),
            extensionsUsed=used,  # never extensionsRequired: every extension here degrades
            scene=0,
            scenes=[gl.Scene(name=scene_name, nodes=roots)],
            nodes=nodes,
            meshes=self.meshes,
            materials=self.materials,
            textures=self.textures,
            samplers=[gl.Sampler(magFilter=_LINEAR, minFilter=_LINEAR_MIPMAP_LINEAR,
                                 wrapS=_REPEAT, wrapT=_REPEAT)],
            images=self.images,
            accessors=self.accessors,
            bufferViews=self.views,
            buffers=[gl.Buffer(byteLength=len(self.blob))],
        )
        gltf.set_binary_blob(bytes(self.blob))
        out = gltf.save_to_bytes()
        return b"".join(out) if isinstance(out, (list, tuple)) else bytes(out)


def build_glb(levels: list[tuple[Mesh, bytes, bytes | None]], name: str, unlit: bool,
              layout: str = "files", collision: list[tuple[np.ndarray, np.ndarray]] = (),
              collision_names: str = "godot") -> bytes:
    """`levels` (placed mesh, base-colour PNG, normal-map PNG or None), LOD0 first, as .glb bytes:
    each level its own mesh, material and textures, the node graph by `layout`
    (`lods.lod_nodes`: one level is always one node named `name` with no transform). With a
    normal map the material's `normalTexture` and the primitive's `TANGENT`
    (`normalmap.vertex_tangents`, the frame the map was baked in). Each `collision` piece
    (vertices [V, 3], faces [F, 3], already placed) is one more root node with an untextured,
    position-only mesh named by `collision_node_name`."""
    glb = _Glb()
    multi = len(levels) > 1
    level_meshes = [glb.textured_mesh(m, png, lod_node_name(name, k) if multi else name, unlit, npng)
                    for k, (m, png, npng) in enumerate(levels)]
    colliders = []
    for k, (cv, cf) in enumerate(collision):
        node_name = collision_node_name(name, k, collision_names)
        colliders.append((node_name, glb.collider(cv, cf, node_name)))
    nodes, roots, used = lod_nodes(layout, name, level_meshes, colliders)
    if unlit:
        used = [_UNLIT, *used]
    return glb.to_bytes(name, nodes, roots, used)


def export_glb(mesh: Mesh, texture, cfg: ExportConfig, path: str | os.PathLike,
               lods: list[tuple] | None = None,
               collision: list[tuple[np.ndarray, np.ndarray]] = (),
               normal_map=None) -> ExportResult:
    """Write `mesh` with `texture` [S, S, 3] (float in [0, 1] or uint8, row 0 = top) to `path`,
    and `normal_map` [S', S', 3] (tangent-space, same layout) as its normal texture if given.

    The asset is re-centred (pivot at the bottom centre) and uniformly scaled to `cfg.height`
    metres. `cfg.lods` coarser levels follow: `lods` (mesh, texture[, normal map]) made by the
    caller (the pipeline re-unwraps each level), or else each level decimated from the previous
    keeping its UVs and the same texture (which stops halving once the seams dominate). Every
    level is placed exactly like the main mesh, so they line up; `cfg.lod_layout` puts them in
    files of their own (NAME_lod1.glb, …) or into the one .glb (`tdgen.lods`). `collision`
    pieces (`collision.collision_shapes`, in the mesh's frame) go into the main file only, placed
    the same way. Every file is built in memory first and then written atomically, so a failure
    leaves no partial output.
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
    # levels: (placed mesh, base-colour PNG, normal-map PNG or None), LOD0 first
    levels = [(placed(mesh), png, normal_png)]
    if lods is not None:
        if len(lods) != cfg.lods:
            raise ValueError(f"export.lods is {cfg.lods} but {len(lods)} LOD meshes were given")
        for lod, lod_tex, *lod_normal in lods:
            if lod.uvs is None:
                raise ValueError("every LOD mesh needs uvs")
            lod_npng = (encode_png(texture_to_uint8(lod_normal[0]))
                        if lod_normal and lod_normal[0] is not None else None)
            levels.append((placed(lod), encode_png(texture_to_uint8(lod_tex)), lod_npng))
    else:
        # Decimating keeps the uvs but not the surface the map was baked against: no normal map.
        lod = mesh
        for _ in range(cfg.lods):
            lod = decimate_keep_uvs(lod, max(1, lod.num_faces // 2))
            levels.append((placed(lod), png, None))

    if cfg.lod_layout == "files":
        outputs = [(path, build_glb(levels[:1], path.stem, unlit, "files", pieces, cfg.collision_names))]
        outputs += [(lod_path(path, k), build_glb([lv], lod_path(path, k).stem, unlit))
                    for k, lv in enumerate(levels[1:], start=1)]
    else:  # every level in the one file (`lods.lod_nodes` lays them out)
        outputs = [(path, build_glb(levels, path.stem, unlit, cfg.lod_layout, pieces, cfg.collision_names))]
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

"""How levels of detail are laid out: separate files, or one .glb whose node graph an engine reads.

`export.lod_layout` picks one (see `ExportConfig.lod_layout` and the README's per-engine notes):

- `files`: NAME.glb, NAME_lod1.glb, … (one level per file; any importer, LODs wired by hand).
- `nodes`: one file, a parent node NAME (no mesh) whose children NAME_LOD0, NAME_LOD1, … each
  carry their own mesh, material and textures, all placed alike. `_LODn` children of one parent
  is the FBX convention Unity's model importer turns into a LODGroup; the parent's extras
  `fbx_type: LodGroup` become a Blender custom property that Blender's FBX exporter writes as an
  FBX LOD group (what Unreal's FBX import reads). No glTF importer we know applies either rule,
  so one that ignores them draws every level in the same place.
- `msft_lod`: one file in which the LOD0 node carries `MSFT_lod` (the coarser nodes' indices)
  and the `MSFT_screencoverage` extra, as the extension's spec says. The coarser nodes are not
  scene roots, so a loader without the extension shows LOD0 alone; the extension is in
  extensionsUsed only, never extensionsRequired.

This module decides the node graph only; `export.build_glb` writes the meshes it points at.
"""

from __future__ import annotations

from pathlib import Path

MSFT_LOD = "MSFT_lod"
SCREEN_COVERAGE = "MSFT_screencoverage"

FIRST_SWITCH = 0.5
"""Screen coverage (a fraction of the screen's height, the unit of Unity's LODGroup) below which
LOD0 gives way to LOD1: UnityGLTF's own default for MSFT_lod files that carry no coverage."""


def lod_path(path: Path, level: int) -> Path:
    """`NAME.glb` → `NAME_lod{level}.glb` beside it (the `files` layout)."""
    return path.with_name(f"{path.stem}_lod{level}{path.suffix}")


def lod_node_name(name: str, level: int) -> str:
    """`NAME_LOD{level}`: Unity's model-importer suffix (`_LOD0` the most detailed)."""
    return f"{name}_LOD{level}"


def screen_coverage(levels: int) -> list[float]:
    """`MSFT_screencoverage` for `levels` levels (LOD0 included): entry k is the coverage below
    which level k stops drawing. Each level has half the triangles of the last and a mesh's
    on-screen triangle density goes with its projected area, i.e. coverage², so the switches
    step by 1/√2 from `FIRST_SWITCH`. The last entry is 0: the coarsest level never culls the
    asset (that is the game's decision, not the asset's)."""
    return [round(FIRST_SWITCH * 2.0 ** (-k / 2), 4) for k in range(levels - 1)] + [0.0]


def lod_nodes(layout: str, name: str, level_meshes: list[int], collider_meshes: list[tuple[str, int]]):
    """The node graph of one .glb: (nodes, scene root indices, extensions used).

    `level_meshes` are mesh indices, LOD0 first; `collider_meshes` (node name, mesh index) pairs
    become root nodes after the render nodes in every layout (engines look for them at the top).
    Every node has the identity transform: the levels were placed alike by the exporter.
    """
    import pygltflib as gl

    nodes: list = []
    roots: list[int] = []
    used: list[str] = []
    if len(level_meshes) == 1:  # one level: the plain asset, whatever the layout
        nodes.append(gl.Node(name=name, mesh=level_meshes[0]))
        roots.append(0)
    elif layout == "files":
        raise ValueError("the files layout writes one level per file")
    elif layout == "nodes":
        children = list(range(1, 1 + len(level_meshes)))
        nodes.append(gl.Node(name=name, children=children, extras={"fbx_type": "LodGroup"}))
        nodes += [gl.Node(name=lod_node_name(name, k), mesh=m) for k, m in enumerate(level_meshes)]
        roots.append(0)
    elif layout == "msft_lod":
        coarser = list(range(1, len(level_meshes)))
        nodes.append(gl.Node(name=name, mesh=level_meshes[0], extensions={MSFT_LOD: {"ids": coarser}},
                             extras={SCREEN_COVERAGE: screen_coverage(len(level_meshes))}))
        nodes += [gl.Node(name=lod_node_name(name, k), mesh=m)
                  for k, m in enumerate(level_meshes[1:], start=1)]
        roots.append(0)  # the coarser nodes are reached through the extension only
        used.append(MSFT_LOD)
    else:
        raise ValueError(f"unknown LOD layout {layout!r}")
    for node_name, mesh in collider_meshes:
        roots.append(len(nodes))
        nodes.append(gl.Node(name=node_name, mesh=mesh))
    return nodes, roots, used

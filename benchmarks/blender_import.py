"""Import exported .glb files into Blender (a real importer) and report what an artist checks.

Runs inside Blender, headless:

    blender -b --python benchmarks/blender_import.py -- OUT.json A.glb [B.glb ...] [--render DIR] [--fbx DIR]

For every file: the object and mesh count, the object names and how many are colliders (Godot's
-convcolonly / Unreal's UCX_ names), vertices and faces, UV layers, size in Blender's
Z-up frame (glTF +Y up arrives as Blender +Z: the height is the Z size), the lowest Z (0 for a
bottom pivot), the images on the material with their colour space, and whether an image feeds
the shader, where the normal map goes (image colour space, Normal Map node → BSDF Normal) and
how close the file's TANGENT is to Blender's own MikkTSpace tangents, and every object's type,
parent and custom properties (`tree`, for LOD layouts). With `--render DIR`, one Eevee view per
file from the front-right (glTF +Z front is Blender −Y), 20° above; with `--fbx DIR`, each
imported scene exported again as FBX and whether it holds an FBX LOD group. Prints and writes
one JSON object.
"""

import json
import math
import os
import re
import sys

import numpy

# Debian's Blender 3.4 glTF add-on still uses numpy.bool, which NumPy 1.24 removed.
if "bool" not in numpy.__dict__:
    numpy.bool = numpy.bool_

import bpy  # noqa: E402  (Blender's own module: only inside Blender)
from mathutils import Vector  # noqa: E402


def inspect(path: str) -> dict:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=path)
    objects = list(bpy.context.scene.objects)
    meshes = [o for o in objects if o.type == "MESH"]
    rec = {"file": os.path.basename(path), "objects": len(objects), "meshes": len(meshes),
           "names": sorted(o.name for o in objects),
           "colliders": sum(is_collider(o.name) for o in objects),
           "tree": tree(objects)}
    if not meshes:
        return rec
    o = render_mesh(meshes)
    corners = [o.matrix_world @ Vector(c) for c in o.bound_box]
    lo = [min(v[k] for v in corners) for k in range(3)]
    hi = [max(v[k] for v in corners) for k in range(3)]
    mat = o.active_material
    nodes = mat.node_tree.nodes if mat and mat.node_tree else []
    rec.update({
        "vertices": len(o.data.vertices),
        "faces": len(o.data.polygons),
        "uv_layers": [uv.name for uv in o.data.uv_layers],
        "size_xyz": [round(hi[k] - lo[k], 4) for k in range(3)],
        "min_z": round(lo[2], 4),
        "images": [{"name": n.image.name, "size": list(n.image.size),
                    "colorspace": n.image.colorspace_settings.name}
                   for n in nodes if n.type == "TEX_IMAGE" and n.image],
        "shader_nodes": sorted({n.type for n in nodes}),
        "image_feeds_shader": bool(mat) and any(
            link.from_node.type == "TEX_IMAGE" for link in mat.node_tree.links),
        "normal_map": normal_map(mat),
        "tangents": tangent_agreement(o, path),
    })
    return rec


def tree(objects) -> dict:
    """Every object by name: its type, parent, face count and material images (meshes) and custom
    properties (the glTF node's extras, which the importer keeps), for LOD layouts."""
    def props(o):
        return {k: (o[k] if isinstance(o[k], (str, int, float)) else list(o[k]))
                for k in o.keys() if not k.startswith("_")}

    def images(o):  # the images on the object's material, by name
        mat = o.active_material if o.type == "MESH" else None
        return sorted(n.image.name for n in mat.node_tree.nodes
                      if n.type == "TEX_IMAGE" and n.image) if mat and mat.node_tree else []

    return {o.name: {"type": o.type, "parent": o.parent.name if o.parent else None,
                     "faces": len(o.data.polygons) if o.type == "MESH" else None, "props": props(o),
                     "images": images(o)}
            for o in objects}


def export_fbx(path: str, out_dir: str) -> dict:
    """The scene `inspect` left loaded, exported by Blender's FBX exporter (what an artist does
    to hand a .glb to an FBX pipeline), and what the FBX holds: whether an Empty came out as an
    FBX LOD group (its `fbx_type` custom property sets the FBX node attribute; written raw, the
    string appears nowhere else while custom properties are off, the exporter's default)."""
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".fbx")
    bpy.ops.export_scene.fbx(filepath=out)
    with open(out, "rb") as fh:
        data = fh.read()
    return {"file": os.path.basename(out), "lod_group": b"LodGroup" in data,
            "lod_names": sorted({m.decode() for m in re.findall(rb"[A-Za-z0-9_]+_LOD[0-9]+", data)})}


def normal_map(mat) -> dict | None:
    """Where the material's normal map goes: an image → Normal Map node (tangent space, which
    UV map) → the BSDF's Normal input, and the image's colour space (Non-Color: data, not sRGB)."""
    if not mat or not mat.node_tree:
        return None
    links = mat.node_tree.links
    for node in mat.node_tree.nodes:
        if node.type != "NORMAL_MAP":
            continue
        images = [l.from_node for l in links if l.to_node == node and l.to_socket.name == "Color"
                  and l.from_node.type == "TEX_IMAGE"]
        return {
            "space": node.space, "uv_map": node.uv_map,
            "image_colorspace": images[0].image.colorspace_settings.name if images else None,
            "feeds_bsdf_normal": any(l.from_node == node and l.to_node.type == "BSDF_PRINCIPLED"
                                     and l.to_socket.name == "Normal" for l in links),
        }
    return None


def _glb_tangents(path: str):
    """The file's TANGENT [V, 4] of its first mesh's first primitive, or None (a minimal .glb
    reader: the importer does not keep tangents, Blender computes its own)."""
    import struct

    with open(path, "rb") as fh:
        data = fh.read()
    n_json = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20:20 + n_json])
    blob = data[20 + n_json + 8:]
    index = gltf["meshes"][0]["primitives"][0]["attributes"].get("TANGENT")
    if index is None:
        return None
    acc = gltf["accessors"][index]
    view = gltf["bufferViews"][acc["bufferView"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    return numpy.frombuffer(blob, numpy.float32, acc["count"] * 4, start).reshape(-1, 4)


def tangent_agreement(o, path: str) -> dict | None:
    """How far the file's TANGENT is from the MikkTSpace tangents Blender computes itself (its
    normal maps always use those) on every face corner: angles in degrees, and the share of
    corners whose bitangent sign agrees. The importer keeps the file's vertex order."""
    t = _glb_tangents(path)
    if t is None:
        return None
    me = o.data
    me.calc_normals_split()  # the file's normals (custom split normals): MikkTSpace's input
    me.calc_tangents(uvmap=me.uv_layers.active.name)
    ours = numpy.array([t[l.vertex_index] for l in me.loops])  # [L, 4], glTF frame
    # glTF (x, y, z) arrives as Blender (x, −z, y)
    theirs = numpy.array([(l.tangent[0], l.tangent[2], -l.tangent[1]) for l in me.loops])
    sign = numpy.array([l.bitangent_sign for l in me.loops])
    cos = numpy.clip((ours[:, :3] * theirs).sum(1) / numpy.maximum(
        numpy.linalg.norm(theirs, axis=1), 1e-12), -1.0, 1.0)
    deg = numpy.degrees(numpy.arccos(cos))
    return {"corners": len(deg), "median_deg": round(float(numpy.median(deg)), 4),
            "p99_deg": round(float(numpy.percentile(deg, 99)), 4), "max_deg": round(float(deg.max()), 4),
            "sign_agree": round(float((numpy.sign(ours[:, 3]) == numpy.sign(sign)).mean()), 6)}


def render_mesh(meshes):
    """The most detailed mesh that is not a collider (LOD0 where there are levels)."""
    return max([m for m in meshes if not is_collider(m.name)] or meshes, key=lambda m: len(m.data.polygons))


def is_collider(name: str) -> bool:
    """Godot's -colonly / -convcolonly hints and Unreal's UCX_ prefix (tdgen's collision nodes)."""
    return name.endswith(("-colonly", "-convcolonly")) or name.startswith("UCX_")


def render(path: str, out_png: str, size: int = 384) -> None:
    """One lit view of the scene `inspect` left loaded. Coarser LODs (NAME_LOD1, …) and colliders
    are drawn beside it instead of over it: the render mesh on the left, then each coarser level,
    then its collision hulls (one colour each) on the right."""
    scn = bpy.context.scene
    meshes = [o for o in scn.objects if o.type == "MESH"]
    o = render_mesh(meshes)
    corners = [o.matrix_world @ Vector(c) for c in o.bound_box]
    lo = [min(v[k] for v in corners) for k in range(3)]
    hi = [max(v[k] for v in corners) for k in range(3)]
    centre = Vector([(lo[k] + hi[k]) / 2 for k in range(3)])
    reach = max(hi[k] - lo[k] for k in range(3))
    width = hi[0] - lo[0]
    coarser = sorted((m for m in meshes if re.search(r"_LOD[1-9][0-9]*$", m.name)), key=lambda m: m.name)
    colliders = [m for m in meshes if is_collider(m.name)]
    for k, m in enumerate(coarser, start=1):
        m.location.x += 1.2 * k * width  # beside the asset, along Blender's +X
    for k, c in enumerate(colliders):
        c.location.x += 1.2 * (1 + len(coarser)) * width
        mat = bpy.data.materials.new(f"collider{k}")
        hue = (0.13 * k) % 1.0
        mat.diffuse_color = (*[0.35 + 0.5 * abs(((hue * 6 + off) % 6) - 3) / 3 for off in (0, 4, 2)], 1.0)
        c.data.materials.append(mat)
    beside = len(coarser) + bool(colliders)  # copies of the asset's width to the right
    if beside:
        centre.x += 0.6 * beside * width
        reach *= 1 + 0.8 * beside
    scn.render.engine = "BLENDER_EEVEE"
    scn.render.resolution_x = scn.render.resolution_y = size
    scn.world = bpy.data.worlds.new("world")
    scn.world.color = (0.5, 0.5, 0.5)
    cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    scn.collection.objects.link(cam)
    d, az, el = 2.8 * reach, math.radians(30), math.radians(20)
    cam.location = centre + Vector((d * math.sin(az) * math.cos(el), -d * math.cos(az) * math.cos(el),
                                    d * math.sin(el)))
    cam.rotation_euler = (centre - cam.location).to_track_quat("-Z", "Y").to_euler()
    scn.camera = cam
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (math.radians(50), 0.0, math.radians(30))
    scn.collection.objects.link(sun)
    scn.render.filepath = out_png
    bpy.ops.render.render(write_still=True)


def main() -> None:
    args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    render_dir = fbx_dir = None
    if "--render" in args:
        i = args.index("--render")
        render_dir = args[i + 1]
        del args[i : i + 2]
    if "--fbx" in args:
        i = args.index("--fbx")
        fbx_dir = args[i + 1]
        del args[i : i + 2]
    out_json, files = args[0], args[1:]
    report = {"blender": bpy.app.version_string, "files": []}
    for f in files:
        rec = inspect(f)
        if fbx_dir:
            rec["fbx"] = export_fbx(f, fbx_dir)
        if render_dir and rec.get("meshes"):
            png = os.path.join(render_dir, os.path.splitext(os.path.basename(f))[0] + ".blender.png")
            render(f, png)
            rec["render"] = os.path.basename(png)
        report["files"].append(rec)
    text = json.dumps(report, indent=1)
    with open(out_json, "w") as fh:
        fh.write(text)
    print(text)


main()

"""The nodes' interface as the frontend and saved workflows see it, pinned against the V1 nodes it replaced.

tests/data/node_schema_v1.json was written from the V1 node classes (before the move to ComfyUI's V3 API):
node ids, display names, input names in order, widget options (defaults, ranges, tooltips), outputs.
A saved workflow stores widget values by position and links by slot, so any change here breaks it.  After an
intended change (a new optional input goes last), rewrite the snapshot and review its diff:
    OMP_NUM_THREADS=1 .testhost/venv/bin/python tests/test_node_schema.py"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).resolve().parent / "data" / "node_schema_v1.json"
FD_NODES = ["FasterDiffusionApply", "FasterDiffusionSampler", "FasterDiffusionKSampler",
            "FasterDiffusionCalibrate", "FasterDiffusionOnePass", "FasterDiffusionCompare"]


def host_lists():
    """The host's own choice lists a node may offer (they grow with ComfyUI: 0.33 added two samplers)."""
    import comfy.samplers
    return {"<ComfyUI's samplers>": list(comfy.samplers.SAMPLER_NAMES),
            "<ComfyUI's schedulers>": list(comfy.samplers.SCHEDULER_NAMES)}


def host_list_named(options):
    """A combo offering the host's own list (less a few it leaves out) written as that list's name and the names
    left out, so the snapshot holds on every ComfyUI version; any other options as they are."""
    for name, full in host_lists().items():
        left_out = [o for o in full if o not in options]
        if [o for o in full if o in options] == list(options) and len(left_out) < len(full) / 2:
            return [name] + [f"-{o}" for o in left_out]
    return list(options)


def normalized(spec_input):
    """(type, options) with a V1 combo (a list of choices) written as V3 writes it: "COMBO" + options."""
    typ, *rest = spec_input
    opts = dict(rest[0]) if rest else {}
    if isinstance(typ, list):
        typ, opts = "COMBO", {**opts, "options": list(typ)}
    if "options" in opts:
        opts["options"] = host_list_named(opts["options"])
    for flag in ("multiline", "multiselect"):    # defaults V3 always writes (V1 only where a node said so)
        if opts.get(flag) is False:
            del opts[flag]
    return [str(typ), opts]


def describe(nodes, name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    return {
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS[name],
        "category": cls.CATEGORY,
        "description": cls.DESCRIPTION,
        "inputs": {section: [[k, *normalized(v)] for k, v in spec.get(section, {}).items()]
                   for section in ("required", "optional")},
        "hidden": sorted(spec.get("hidden", {})),
        "outputs": list(cls.RETURN_TYPES),
        "output_names": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
        "output_tooltips": list(cls.OUTPUT_TOOLTIPS),
    }


@pytest.fixture(scope="module")
def nodes(pack):
    import nodes
    return nodes


@pytest.mark.parametrize("name", FD_NODES)
def test_node_interface_is_unchanged(nodes, name):
    assert json.loads(json.dumps(describe(nodes, name))) == json.loads(SNAPSHOT.read_text())[name]


def write_snapshot(nodes):
    SNAPSHOT.write_text(json.dumps({n: describe(nodes, n) for n in FD_NODES}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import sys
    import tempfile
    sys.path.insert(0, str(SNAPSHOT.parent.parent.parent))
    import testmodel as tm
    tm.boot_comfy()
    tm.load_pack(tempfile.mkdtemp())
    import nodes as comfy_nodes
    write_snapshot(comfy_nodes)
    print(f"wrote {SNAPSHOT}")

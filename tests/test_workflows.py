"""The shipped example workflows load against the real node definitions (UI format, positional widgets)."""
import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))


WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}
FRONTEND_ONLY = ("control_after_generate", "upload")       # widgets the frontend adds: no node input
# combos listing the host's files: any name loads
FILE_LISTS = ("ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "image")


def widget_values(spec, values):
    """(name, type, options, value) per widget of a saved node, paired as the frontend pairs them: by position."""
    specs = {**spec.get("required", {}), **spec.get("optional", {})}
    names = [n for n in widget_inputs(spec) if n not in FRONTEND_ONLY]
    values = [v for n, v in zip(widget_inputs(spec), values) if n not in FRONTEND_ONLY]
    return [(n, specs[n][0], specs[n][1] if len(specs[n]) > 1 else {}, v) for n, v in zip(names, values)]


def widget_inputs(spec):
    """Names of the inputs the frontend shows as widgets, in order (plus KSampler's hidden seed control and an
    image input's upload button)."""
    names = []
    for section in ("required", "optional"):
        for name, (typ, *opts) in spec.get(section, {}).items():
            if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                if name in ("seed", "noise_seed"):
                    names.append("control_after_generate")
                if opts and opts[0].get("image_upload"):   # LoadImage's upload button, saved as "image"
                    names.append("upload")
    return names


@pytest.fixture(scope="module")
def all_nodes(pack):
    """ComfyUI's node registry with its built-in extra nodes (SamplerCustom, BasicScheduler, ...) loaded."""
    import asyncio
    import nodes
    used = {n["type"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]}
    if not used <= set(nodes.NODE_CLASS_MAPPINGS):
        asyncio.run(nodes.init_builtin_extra_nodes())
    return nodes


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_node_definitions(all_nodes, path):
    nodes = all_nodes
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    by_id = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert n["type"] in nodes.NODE_CLASS_MAPPINGS, n["type"]
        spec = nodes.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
        assert len(n["widgets_values"]) == len(widget_inputs(spec)), n["type"]
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert by_id[src]["outputs"][src_slot]["type"] == typ and link_id in (by_id[src]["outputs"][src_slot]["links"] or [])
        assert by_id[dst]["inputs"][dst_slot] == {"name": by_id[dst]["inputs"][dst_slot]["name"], "type": typ, "link": link_id}
        # the API prompt names each input as saved: it must be the node's own input, of the link's type
        assert tuple(nodes.NODE_CLASS_MAPPINGS[by_id[src]["type"]].RETURN_TYPES)[src_slot] == typ, (by_id[src]["type"], src_slot)
        dst_spec = nodes.NODE_CLASS_MAPPINGS[by_id[dst]["type"]].INPUT_TYPES()
        name = by_id[dst]["inputs"][dst_slot]["name"]
        assert {**dst_spec["required"], **dst_spec.get("optional", {})}.get(name, (None,))[0] == typ, \
            (by_id[dst]["type"], name, typ)
    fd = [n for n in wf["nodes"] if n["type"].startswith("FasterDiffusion")]
    assert fd, "every example shows a FasterDiffusion node"
    for n in wf["nodes"]:
        spec = nodes.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
        for name, typ, opts, value in widget_values(spec, n["widgets_values"]):    # a reordered widget shows here
            if typ == "COMBO" or isinstance(typ, list):
                assert name in FILE_LISTS or value in (typ if isinstance(typ, list) else opts["options"]), \
                    (n["type"], name, value)
            else:
                assert isinstance(value, WIDGET_TYPES[typ]) and not (typ != "BOOLEAN" and isinstance(value, bool)), \
                    (n["type"], name, value)
                assert opts.get("min", value) <= value <= opts.get("max", value), (n["type"], name, value)
    for n in fd:
        spec = nodes.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
        if "strategy" not in widget_inputs(spec):      # FasterDiffusion One-Pass: no key steps to choose
            continue
        strategy = n["widgets_values"][widget_inputs(spec).index("strategy")]
        assert nodes.NODE_CLASS_MAPPINGS[n["type"]].validate_inputs(strategy=strategy) is True

"""FasterDiffusion for ComfyUI: training-free encoder propagation (arXiv 2312.09608).

ComfyUI imports this file from custom_nodes/<pack>/ and calls ``comfy_entrypoint`` (the V3 node API; no
NODE_CLASS_MAPPINGS: ComfyUI takes those first when present).  The algorithm lives in ``fasterdiffusion/``
(host-free), the ComfyUI glue in ``patches/comfy/``, the nodes in ``nodes/`` (registered in nodes/__init__.py).
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

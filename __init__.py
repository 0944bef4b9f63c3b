"""FasterDiffusion for ComfyUI: training-free encoder propagation (arXiv 2312.09608).

ComfyUI imports this file from custom_nodes/<pack>/.  The algorithm lives in ``fasterdiffusion/``
(host-free), the ComfyUI glue in ``patches/comfy_unet.py``, the nodes in ``nodes/``.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

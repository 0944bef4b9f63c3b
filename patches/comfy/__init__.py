"""ComfyUI: the hooks, adapters and sampler glue the nodes use."""

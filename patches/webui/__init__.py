"""AUTOMATIC1111 and Forge: the glue scripts/fasterdiffusion_webui.py loads."""

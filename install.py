"""Run by ComfyUI-Manager (and by A1111's launcher) after install.  FasterDiffusion needs nothing beyond
what the host already has, so this only says so; it never installs packages (and never torch)."""
print("FasterDiffusion: no extra dependencies to install.")

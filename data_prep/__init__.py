"""Data preparation: robomimic download, scripted demo generation, conversion to a HF `datasets` repo."""

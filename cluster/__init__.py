"""Ray on top of flm/: Ray Train runs the growth plan one stage at a time (DDP or DeepSpeed ZeRO workers).

`flm/` never imports this package; this package imports `flm/` and Ray.
"""

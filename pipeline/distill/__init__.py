"""FD-CLIP feature distillation: a pretrained CLIP's whitened output tokens regressed by a fresh image tower.

``python -m jobs.distill`` (see docs/distill.md); :mod:`pipeline.distill.fdclip` holds the teacher, the student
and the loss, :mod:`pipeline.distill.trainer` the resumable loop and the export.
"""

"""Plug-ins that let other tools run an export: ``lmms_eval_plugin`` (the lmms-eval harness, ``--model memvp``)
and, in ``lmms_eval_tasks/``, ScienceQA tasks for it worded as the model was trained.

They sit above the applications and reuse their parts (memvp-serve's prompt rendering and image encoding),
so an export answers a harness exactly as it answers memvp-serve and memvp-predict.
"""

import os

LMMS_EVAL_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lmms_eval_tasks")
"""lmms-eval's --include_path for the shipped tasks (docs/evaluation.md)."""

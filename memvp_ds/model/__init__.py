from memvp_ds.model.vlm import IGNORE_INDEX, VisualPromptedLM, VLMOutput, build_model

__all__ = ["IGNORE_INDEX", "VisualPromptedLM", "VLMOutput", "build_model"]

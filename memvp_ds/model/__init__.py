from memvp_ds.model.vlm import VisualPromptedLM, VLMOutput, build_model

__all__ = ["VisualPromptedLM", "VLMOutput", "build_model"]

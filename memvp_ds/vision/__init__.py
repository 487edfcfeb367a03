from memvp_ds.vision.clip_features import ClipFeatureExtractor, FeatureRecipe, image_transform

__all__ = ["ClipFeatureExtractor", "FeatureRecipe", "image_transform"]

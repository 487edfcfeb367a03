"""Scoring generated answers against the stored ones: ScienceQA option parsing and accuracy breakdown, VQA
accuracy, captioning BLEU/CIDEr. Plain Python over strings (no torch); each prompt format picks its scorer."""

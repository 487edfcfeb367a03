"""Captioning metrics (BLEU-1..4, CIDEr) through pycocoevalcap, an optional extra: pip install -e ".[caption]"."""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

_TOKEN = re.compile(r"[a-z0-9']+")


def _tokens(text: str) -> str:
    # pycocoevalcap's PTBTokenizer needs Java; lower-casing and dropping punctuation is what it amounts to.
    return " ".join(_TOKEN.findall(text.lower()))


def caption_metrics(pairs: Iterable[Tuple[str, List[str]]]) -> Dict[str, float]:
    """(prediction, reference captions) pairs -> corpus BLEU-1..4 and CIDEr (as the COCO evaluation reports)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError('captioning metrics need pycocoevalcap: pip install -e ".[caption]"') from None
    predictions, references = {}, {}
    for index, (prediction, refs) in enumerate(pairs):
        predictions[str(index)] = [_tokens(prediction)]
        references[str(index)] = [_tokens(r) for r in refs]
    if not predictions:
        return {}
    bleu, _ = Bleu(4).compute_score(references, predictions, verbose=0)
    cider, _ = Cider().compute_score(references, predictions)
    return {**{f"caption/bleu{n + 1}": 100.0 * b for n, b in enumerate(bleu)}, "caption/cider": 100.0 * cider}

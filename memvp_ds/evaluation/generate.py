"""Batched greedy generation over evaluation batches."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch

from memvp_ds.progress import progress


@torch.no_grad()
def generate_records(model, batches: Iterable[Dict[str, Any]], tokenizer, max_new_tokens: int,
                     stop_when_done: bool = True, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None, show_progress: bool = True) -> List[Dict[str, Any]]:
    """Greedy answers for every valid row of left-padded eval batches (a progress bar if ``show_progress``)."""
    model.eval()
    device = device or next(model.parameters()).device
    records = []
    bar = progress(desc="generate", unit="samples", enabled=show_progress)
    for batch in batches:
        # Features, or uint8 pixels for an online vision tower (which normalises them itself).
        visual = ({"images": batch["images"].to(device)} if "images" in batch
                  else {"image_features": batch["image_features"].to(device, dtype)})
        tokens = model.generate(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), **visual,
            has_image=batch["has_image"].to(device),
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, stop_when_done=stop_when_done,
        )
        for row, valid in enumerate(batch["valid"].tolist()):
            if not valid:
                continue
            prompt_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            prompt_ids = prompt_ids[prompt_ids >= 0]  # the text: negative ids are images' positions in it
            new = [t for t in tokens[row].tolist() if t != tokenizer.eos_token_id]
            records.append({
                "id": batch["keys"][row], "fields": batch["fields"][row],
                "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                "output": tokenizer.decode(new, skip_special_tokens=True),
            })
        bar.update(int(batch["valid"].sum()))
    bar.close()
    return records

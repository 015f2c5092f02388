"""Prompt encoding exactly as SkyReelsV2Pipeline does it (`_get_t5_prompt_embeds`), for a batch."""

from __future__ import annotations

import numpy as np
import torch


def clean_prompt(text: str) -> str:
    from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2 import prompt_clean

    return prompt_clean(text)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int,
                   device: torch.device) -> np.ndarray:
    """-> float32 (B, max_sequence_length, D); rows after each prompt's real tokens are zero."""
    cleaned = [clean_prompt(p) for p in prompts]
    inputs = tokenizer(cleaned, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    seq_lens = mask.gt(0).sum(dim=1).long()
    hidden = text_encoder(ids, mask).last_hidden_state
    out = torch.zeros_like(hidden, dtype=torch.float32)
    for row, n in enumerate(seq_lens.tolist()):
        out[row, :n] = hidden[row, :n].float()
    return out.cpu().numpy()

"""Which prompt tokens are the user's own: chat templates wrap every prompt in the same system and role
tokens, which carry no information about the task and dominate sequence-level scores if counted.

ChatML (`<|im_start|>user\\n ... <|im_end|>`, SmolLM2, Qwen) and Llama-3 (`<|start_header_id|>user
<|end_header_id|>\\n\\n ... <|eot_id|>`) are recognised from the tokenizer's special tokens; the last user
turn counts. Prompts without a recognised template count every attended token.
"""

from __future__ import annotations

import torch

__all__ = ["user_messages", "user_token_mask"]

# (opening token, closing token of the role header or None, end-of-turn token)
_TEMPLATES = (("<|im_start|>", None, "<|im_end|>"), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))


def _special_id(tokenizer, token: str) -> int | None:
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if ids and ids[0] is not None and ids[0] != unk else None


def user_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer, *,
                    allow_empty: bool = False) -> torch.Tensor:
    """(batch, L) bool: the tokens of each row's last user message (or every attended token when the row
    uses no known chat template). Raises ValueError naming the row when a user message is empty, unless
    allow_empty (then that row's mask is all False)."""
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if tokenizer is None or not hasattr(tokenizer, "encode"):          # no chat template to recognise
        return attended
    role = tokenizer.encode("user", add_special_tokens=False)
    mask = attended.clone()
    for opening, header_end, turn_end in _TEMPLATES:
        open_id, end_id = _special_id(tokenizer, opening), _special_id(tokenizer, turn_end)
        close_id = _special_id(tokenizer, header_end) if header_end else None
        if open_id is None or end_id is None or (header_end and close_id is None):
            continue
        for row, ids in enumerate(input_ids.tolist()):
            starts = [i for i in range(len(ids) - len(role)) if ids[i] == open_id and ids[i + 1:i + 1 + len(role)] == role]
            if not starts:
                continue
            first = starts[-1] + 1 + len(role)
            if close_id is not None:
                first = ids.index(close_id, first) + 1 if close_id in ids[first:] else first
            while first < len(ids) and tokenizer.decode([ids[first]]).strip() == "" and ids[first] != end_id:
                first += 1                                           # the newline(s) after the role header
            last = ids.index(end_id, first) if end_id in ids[first:] else len(ids)
            span = torch.zeros(len(ids), dtype=torch.bool)
            span[first:last] = True
            mask[row] = span & attended[row]
            if not allow_empty and not bool(mask[row].any()):
                raise ValueError(f"prompt row {row} has no user tokens (an empty user message): nothing to route by")
    return mask


def user_messages(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer) -> list[str]:
    """Each row's last user message as text, without the chat template and system prompt around it ("" for
    an empty message): what text routers compare with the adapters' descriptions."""
    mask = user_token_mask(input_ids, attention_mask, tokenizer, allow_empty=True)
    return [tokenizer.decode(ids[keep], skip_special_tokens=True).strip() for ids, keep in zip(input_ids, mask)]

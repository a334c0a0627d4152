"""What the study checks of a real tokenizer loaded from a folder: the context length its model admits, and
that it reads the texts a scorer scores (conngeo.scoring, conngeo.references)."""

from __future__ import annotations

from transformers.tokenization_utils_base import LARGE_INTEGER

# text models whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids):
# their tables hold pad_token_id + 1 positions that no token takes
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert")


def context_length(config) -> int:
    """The most tokens (special tokens included) a text model's position table admits:
    max_position_embeddings, less pad_token_id + 1 where positions start after the padding index
    (RoBERTa: 514 - 2 = 512)."""
    offset = config.pad_token_id + 1 if config.model_type in POSITIONS_AFTER_PADDING else 0
    return config.max_position_embeddings - offset


def bound_to_model(tokenizer, config):
    """`tokenizer` with model_max_length = the model's `context_length` where its folder sets none.

    A folder without tokenizer_config.json (the hub's FacebookAI/roberta-large has none) leaves transformers'
    1e30 sentinel, and encoding with max_length=model_max_length, truncation=True (as bert-score does)
    raises OverflowError."""
    if tokenizer.model_max_length > LARGE_INTEGER:
        tokenizer.model_max_length = context_length(config)
    return tokenizer


def unknown_share(tokenizer, text: str) -> float:
    """The share of `text`'s tokens (its own: the special tokens a template adds left out) that are the
    tokenizer's unknown token; 0 for a tokenizer without one (byte-level BPE reads any text)."""
    unk = tokenizer.unk_token_id
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if unk is None or not ids:
        return 0.0
    return sum(i == unk for i in ids) / len(ids)


def check_readable(tokenizer, texts, limit: float, who: str) -> None:
    """Stop where `tokenizer` maps more than `limit` of a text's tokens to its unknown token: a model scoring
    such a text reads noise (a word-level tokenizer meeting words it was never built for), silently."""
    for text in dict.fromkeys(texts):
        share = unknown_share(tokenizer, text)
        if share > limit:
            raise ValueError(f"{who}'s tokenizer reads {share:.0%} of the tokens of {text!r} as unknown "
                             f"({tokenizer.unk_token}), more than {limit:.0%}: its scores would read noise. Score "
                             "texts in words its vocabulary has (params score.clip_prefix), or another model")

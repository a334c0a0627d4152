"""The tiny zoo's tokenizer: an offline word-level tokenizer over a closed caption vocabulary (the toy-food
world's vocab.txt), shared by the tiny VLMs and the tiny CLIP and SigLIP text towers."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def build_tokenizer(words: list[str], special_tokens: list[str] = ()) -> PreTrainedTokenizerFast:
    """Whitespace-split words -> ids. Ids 0-3 are pad/unk/bos/eos, then `special_tokens` (a family's
    image placeholders), then the words in the given order."""
    specials = [PAD, UNK, BOS, EOS, *special_tokens]
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                  eos_token=EOS, additional_special_tokens=list(special_tokens))
    tok.padding_side = "left"  # batched generation appends to the right
    return tok


def read_vocab(path) -> list[str]:
    with open(path) as f:
        return [w.strip() for w in f if w.strip()]

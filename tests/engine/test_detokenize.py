"""Incremental detokenization against whole-text decoding, on a SentencePiece-style (Metaspace)
tokenizer and on the default model's byte-level one."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lorafleet_server.engine.detokenize import IncrementalDetokenizer


def streamed(tokenizer: object, prompt: list[int], generated: list[int]) -> str:
    detok = IncrementalDetokenizer(tokenizer, prompt)  # type: ignore[arg-type]
    return "".join(detok.push(t) for t in generated) + detok.flush()


def test_the_first_token_keeps_its_leading_space_after_the_prompt() -> None:
    """Metaspace decoders strip the space of a sequence's first word: decoded alone, the first
    generated token lost it ("Paris." for " Paris.")."""
    vocab = {"<unk>": 0, "▁The": 1, "▁capital": 2, "▁is": 3, "▁Paris": 4, ".": 5}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    model.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    assert streamed(tokenizer, [1, 2, 3], [4, 5]) == " Paris."
    assert streamed(tokenizer, [], [4, 5]) == "Paris."  # no prompt: the sequence's first word


def test_byte_level_text_matches_the_whole_decode(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.encode("Say it twice:", add_special_tokens=False)
    generated = tokenizer.encode(" naïve 🚀 café — done.", add_special_tokens=False)
    whole = tokenizer.decode(prompt + generated)
    assert streamed(tokenizer, prompt, generated) == whole[len(tokenizer.decode(prompt)) :]


def test_stop_matcher_cuts_at_the_first_stop_in_the_text_whichever_stop_it_is() -> None:
    """Two stops ending in one chunk: the text ends before the earlier one, whatever their order in
    the request (a mutation test found no test with two stops that both match)."""
    from lorafleet_server.engine.detokenize import StopMatcher

    for stops in ((".", "\n"), ("\n", ".")):
        matcher = StopMatcher(stops)
        assert matcher.feed("Hello") == ("Hello", False)
        assert matcher.feed(" world.\nMore") == (" world", True)
    matcher = StopMatcher(("END", "ND!"))  # overlapping: "END" starts first
    assert matcher.feed("the EN") == ("the ", False)  # "EN" held: it may begin a stop
    assert matcher.feed("D!") == ("", True)

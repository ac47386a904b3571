"""Incremental detokenization against whole-text decoding, on a SentencePiece-style (Metaspace)
tokenizer and on the default model's byte-level one."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lorafleet_server.engine.detokenize import IncrementalDetokenizer, fast_decode


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


def test_a_prompt_ending_in_a_special_token_keeps_the_left_context() -> None:
    """A chat prompt ends in a special token (Mistral's "[/INST]"), which decodes to nothing: the window
    keeps the prompt words before it, so the first generated word keeps its space (a mutation that
    kept one prompt token survived: " Paris." came out "Paris.")."""
    vocab = {"<unk>": 0, "▁The": 1, "▁capital": 2, "▁is": 3, "▁Paris": 4, ".": 5, "[/INST]": 6}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    model.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[/INST]"]})
    assert tokenizer.convert_tokens_to_ids("[/INST]") == 6 and 6 in tokenizer.all_special_ids
    prompt = [1, 2, 3, 6]
    whole = tokenizer.decode([*prompt, 4, 5], skip_special_tokens=True)
    assert streamed(tokenizer, prompt, [4, 5]) == whole[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]
    assert streamed(tokenizer, prompt, [4, 5]) == " Paris."


def test_a_special_token_generated_amid_the_text_keeps_the_next_words_space() -> None:
    """A generated special token decodes to nothing: the window must not move past the words before it,
    or the next word is decoded as the window's first and its space is stripped (" Paris Paris." came
    out " ParisParis." when the window moved on a token that added no text: a mutation review)."""
    vocab = {"<unk>": 0, "▁The": 1, "▁capital": 2, "▁is": 3, "▁Paris": 4, ".": 5, "<sep>": 6}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    model.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    assert 6 in tokenizer.all_special_ids
    prompt, generated = [1, 2, 3], [4, 6, 4, 5]
    whole = tokenizer.decode([*prompt, *generated], skip_special_tokens=True)
    assert streamed(tokenizer, prompt, generated) == whole[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]
    assert streamed(tokenizer, prompt, generated) == " Paris Paris."


def test_a_possible_stop_held_at_the_end_is_sent_by_flush() -> None:
    """Text held back because it may begin a stop string is sent when the generation ends without one
    (a mutation that made flush() drop it survived: " Hello" with stop "lo!" came out " Hel")."""
    from lorafleet_server.engine.detokenize import StopMatcher

    matcher = StopMatcher(("lo!",))
    assert matcher.feed(" Hello") == (" Hel", False)
    assert matcher.flush() == "lo"
    assert matcher.flush() == ""  # sent once


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
    # one stop twice in a chunk (a multi-token step, or text held back): the first one cuts, so no
    # stop string is ever sent (a mutation that cut at the last one survived)
    matcher = StopMatcher(("\n",))
    assert matcher.feed("one\ntwo\nthree") == ("one", True)
    matcher = StopMatcher(("ab",))
    assert matcher.feed("xa") == ("x", False)
    assert matcher.feed("b-ab") == ("", True)  # the held "a" begins the first one


def test_a_prompt_ending_in_byte_tokens_leaves_the_generated_characters_whole() -> None:
    """Found by an outside review: on a byte-fallback tokenizer (Llama 2, Mistral), a character the
    vocabulary lacks is spelled in byte tokens, and the decoder turns a whole run of them that does not
    begin on a character into U+FFFD. The window's four prompt tokens began inside the prompt's last
    "✨", so the model's "✨✨✨" came out as nine U+FFFD."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for word in ["▁Write", "▁two", ":", "▁", "!", "▁more"]:
        vocab[word] = len(vocab)
    model = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    for prompt_text, more in [("Write two: ✨✨", "✨✨✨ more"), ("Write two: 龘龘", "龘!"), ("Write:", "✨!")]:
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
        generated = tokenizer.encode(more, add_special_tokens=False)[1:]  # without the word-start "▁"
        whole = tokenizer.decode(prompt + generated)
        assert "\ufffd" not in whole
        assert streamed(tokenizer, prompt, generated) == whole[len(tokenizer.decode(prompt)) :], prompt_text


def test_the_rust_decode_is_used_only_where_it_is_the_wrappers(tiny_model_dir: Path) -> None:
    """The detokenizer calls the Rust tokenizer's decode directly (Hugging Face's wrapper costs ~2 us of
    Python a call, ~64 calls a 32-row step); it must give what the wrapper gives, special tokens and
    broken characters included, and the wrapper is kept where it would clean up spaces after it."""
    import random

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    decode = fast_decode(tokenizer)
    assert decode.func == tokenizer.backend_tokenizer.decode  # type: ignore[attr-defined]
    rng = random.Random(0)
    size = len(tokenizer)
    for _ in range(2000):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 12))]
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids
    tokenizer.clean_up_tokenization_spaces = True
    assert fast_decode(tokenizer).func == tokenizer.decode  # type: ignore[attr-defined]

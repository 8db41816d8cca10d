import keras
import pytest
from conftest import make_backbone

from keras_gemma import BeamSampler
from keras_gemma import ChatSession
from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma import GreedySampler
from keras_gemma import TopKSampler
from keras_gemma import format_turns


@pytest.fixture(scope="module")
def lm(tokenizer):
    return GemmaCausalLM(make_backbone("mqa", seed=6), GemmaCausalLMPreprocessor(tokenizer, 40))


def test_stream_pieces_join_to_the_generated_text(lm):
    lm.compile(sampler="greedy")
    prompt = "What is 3 plus 4?"
    pieces = list(lm.generate_stream(prompt, max_length=30))
    assert len(pieces) > 1
    assert "".join(pieces) == lm.generate(prompt, max_length=30, strip_prompt=True)


def test_seeded_stream_is_reproducible_and_draws_like_generate(lm):
    def draw(method):
        lm.compile(sampler=TopKSampler(k=20, seed=3, temperature=1.5))
        if method == "stream":
            return "".join(lm.generate_stream("The", max_length=24))
        return lm.generate("The", max_length=24, strip_prompt=True)

    streamed = draw("stream")
    assert streamed == draw("stream")
    # On TensorFlow too: the loop runs under XLA, a streaming step does not,
    # and the draw is XLA-compiled in both (`backends.compile_random_draw`).
    assert streamed == draw("generate")


def test_stream_stops_at_stop_token(lm):
    lm.compile(sampler="greedy")
    batch = lm.preprocessor.generate_preprocess(["A"], sequence_length=20)
    length = int(batch["padding_mask"].sum())
    tokens = lm.generate(batch, stop_token_ids=None)["token_ids"][0, length:].tolist()
    stop = tokens[3]
    streamed = "".join(lm.generate_stream("A", max_length=20, stop_token_ids=[stop]))
    expected = lm.generate("A", max_length=20, stop_token_ids=[stop], strip_prompt=True)
    assert streamed == expected
    assert streamed == lm.preprocessor.tokenizer.detokenize(tokens[: tokens.index(stop)])


def test_stream_rejects_beam_and_batches(lm):
    lm.compile(sampler=BeamSampler(num_beams=2))
    with pytest.raises(ValueError, match="BeamSampler cannot stream"):
        next(lm.generate_stream("A"))
    lm.compile(sampler="greedy")
    with pytest.raises(TypeError, match="one prompt string"):
        next(lm.generate_stream(["A", "B"]))


def test_format_turns():
    text = format_turns([("user", "Hi"), ("model", "Hello"), ("user", "Bye")])
    assert text == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(ValueError, match="role"):
        format_turns([("system", "x")])


def test_chat_session_keeps_history_and_stops_at_end_of_turn(lm, tokenizer):
    lm.compile(sampler="greedy")
    chat = ChatSession(lm, max_length=40)
    first = chat.send("Hi")
    assert chat.turns == [("user", "Hi"), ("model", first)]
    assert "<end_of_turn>" not in first
    streamed = "".join(chat.send("More", stream=True))
    assert chat.turns[-1] == ("model", streamed)
    # The second prompt carried the first exchange (or dropped it to fit).
    prompt = chat._prompt("Again")
    assert prompt.endswith("<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n")
    assert len(tokenizer.tokenize(prompt)) <= 30
    with pytest.raises(ValueError, match="non-empty string"):
        chat.send("")


class _EndTurnOn(GreedySampler):
    """Greedy, except that the model's pick `token` comes out as `<end_of_turn>`:
    an untrained model that ends its turn where it would have said `token`."""

    def __init__(self, token, end_of_turn_id):
        super().__init__()
        self.token, self.end_of_turn_id = token, end_of_turn_id

    def get_next_token(self, probabilities):
        pick = super().get_next_token(probabilities)
        return keras.ops.where(pick == self.token, self.end_of_turn_id, pick)


def test_chat_reply_ends_at_the_models_end_of_turn(lm, tokenizer):
    lm.compile(sampler="greedy")
    prompt = format_turns([("user", "Hi")])
    batch = lm.preprocessor.generate_preprocess([prompt], sequence_length=40)
    length = int(batch["padding_mask"].sum())
    free = lm.generate(batch, stop_token_ids=None)["token_ids"][0, length:].tolist()
    token = free[3]
    end = free.index(token)
    assert end < len(free) - 1  # the free run goes on past it
    expected = tokenizer.detokenize(free[:end])
    for stream in (False, True):
        lm.compile(sampler=_EndTurnOn(token, tokenizer.end_of_turn_id))
        chat = ChatSession(lm, max_length=80)  # the history fits the next prompt
        reply = chat.send("Hi", stream=stream)
        reply = "".join(reply) if stream else reply
        assert reply == expected
        assert chat.turns == [("user", "Hi"), ("model", expected)]
        # The next prompt closes the reply with the marker the model emitted.
        assert chat._prompt("Bye") == format_turns(
            [("user", "Hi"), ("model", expected), ("user", "Bye")]
        )


def test_chat_history_is_trimmed_oldest_first_and_reset(lm, tokenizer):
    chat = ChatSession(lm, max_length=200)  # prompts up to 150 tokens
    first = [("user", "Hi"), ("model", "Hello, the quick brown fox. " * 3)]
    chat.turns = first + [("user", "Red?"), ("model", "Blue")]

    def size(turns):
        return len(tokenizer.tokenize(format_turns(turns)))

    # Everything fits: the whole history is kept.
    assert size(chat.turns + [("user", "Ok")]) <= 150
    assert chat._prompt("Ok") == format_turns(chat.turns + [("user", "Ok")])
    # The shortest message that overflows the budget with the whole history
    # drops the oldest exchange, and only it.
    words = 1
    while size(chat.turns + [("user", "sea shells " * words)]) <= 150:
        words += 1
    message = "sea shells " * words
    kept = chat.turns[2:] + [("user", message)]
    assert size(kept) <= 150
    assert chat._prompt(message) == format_turns(kept)
    # A message too long on its own is still sent (alone).
    long = "sea shells " * 80
    assert chat._prompt(long) == format_turns([("user", long)])
    assert chat.turns[:2] == first  # trimming a prompt keeps the record
    chat.reset()
    assert chat.turns == []
    assert chat._prompt("Ok") == format_turns([("user", "Ok")])


def test_chat_needs_a_vocabulary_with_turn_markers(tokenizer):
    from helpers import train_raw_sentencepiece

    from keras_gemma import GemmaTokenizer

    model = train_raw_sentencepiece(
        vocab_size=30,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
    )
    plain = GemmaTokenizer(model)
    assert plain.end_of_turn_id is None
    backbone = make_backbone("mqa", vocabulary_size=plain.vocabulary_size())
    with pytest.raises(ValueError, match="<start_of_turn> and <end_of_turn>"):
        ChatSession(GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(plain, 16)))
    with pytest.raises(ValueError, match="<start_of_turn> and <end_of_turn>"):
        ChatSession(GemmaCausalLM(backbone))  # no preprocessor, no vocabulary
    ChatSession(GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, 16)))


def test_stream_holds_back_a_character_split_across_byte_tokens(lm, tokenizer, monkeypatch):
    """Byte-fallback characters arrive one byte token at a time; the stream
    never yields half a character (a replacement character) and its pieces
    join to the text of all the tokens."""
    text = "a日b😀cé"  # 3 and 4 byte characters the vocabulary lacks
    ids = tokenizer.tokenize(text)
    assert sum(tokenizer.id_to_token(i).startswith("<0x") for i in ids) >= 7
    script = ids + [tokenizer.end_token_id, 5, 6]  # stops at <eos>

    def fake_stream(token_ids, padding_mask):
        yield from script

    monkeypatch.setattr(lm.generator, "stream", fake_stream)
    pieces = list(lm.generate_stream("Hi", max_length=40))
    assert not any("\ufffd" in piece for piece in pieces), pieces
    assert "".join(pieces) == text
    # Pieces come as each character completes, not all at the end.
    assert len(pieces) >= 4, pieces
    # A stream cut off mid-character (the length ran out) still ends with
    # what `generate` would decode: the text and one replacement character.
    script = ids[: ids.index(tokenizer.token_to_id("<0xF0>")) + 2]  # half of 😀
    cut = "".join(lm.generate_stream("Hi", max_length=40))
    assert cut == tokenizer.detokenize(script)
    assert cut.startswith("a日b") and cut.endswith("\ufffd")

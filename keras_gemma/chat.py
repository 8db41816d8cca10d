"""Multi-turn chat in the turn format of Gemma's instruction-tuned models."""


def format_turns(turns, add_generation_prompt=True):
    """Formats `(role, text)` turns as Gemma's chat template.

    Roles are `"user"` and `"model"`. The `<bos>` token is not included: the
    preprocessor adds it.

    Example:
    >>> format_turns([("user", "Hi!")])
    '<start_of_turn>user\\nHi!<end_of_turn>\\n<start_of_turn>model\\n'
    """
    parts = []
    for role, text in turns:
        if role not in ("user", "model"):
            raise ValueError(f"A chat turn's role must be 'user' or 'model'. Received {role!r}.")
        parts.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


class ChatSession:
    """A conversation with a `GemmaCausalLM`, keeping the history.

    Each `send` formats the whole history with Gemma's
    `<start_of_turn>user` / `<start_of_turn>model` markers, generates until
    `<end_of_turn>`, and records the reply. When the conversation outgrows
    `max_length`, the oldest turns are dropped.

    Args:
        lm: a `GemmaCausalLM` with a preprocessor whose vocabulary has the
            turn markers (the instruction-tuned presets do).
        max_length: prompt plus reply length, in tokens.

    Example:
        chat = ChatSession(GemmaCausalLM.from_preset("gemma_1.1_instruct_2b_en"))
        print(chat.send("What is Keras?"))
        for piece in chat.send("Shorter, please.", stream=True):
            print(piece, end="")
    """

    def __init__(self, lm, max_length=1024):
        tokenizer = getattr(lm.preprocessor, "tokenizer", None)
        if tokenizer is None or tokenizer.end_of_turn_id is None:
            raise ValueError(
                "Chat needs a model whose vocabulary has <start_of_turn> and "
                "<end_of_turn>, such as an instruction-tuned preset."
            )
        self.lm = lm
        self.max_length = max_length
        self.turns = []

    def _prompt(self, message):
        turns = self.turns + [("user", message)]
        tokenizer = self.lm.preprocessor.tokenizer
        # Drop the oldest exchanges until the prompt leaves a quarter of the
        # budget for the reply.
        budget = self.max_length * 3 // 4
        while len(turns) > 1 and len(tokenizer.tokenize(format_turns(turns))) > budget:
            turns = turns[2:]
        return format_turns(turns)

    def send(self, message, stream=False):
        """Sends a user message; returns the reply, or yields its pieces."""
        if not isinstance(message, str) or not message:
            raise ValueError("A chat message must be a non-empty string.")
        prompt = self._prompt(message)
        if stream:
            return self._stream(message, prompt)
        reply = self.lm.generate(prompt, max_length=self.max_length, strip_prompt=True)
        self.turns += [("user", message), ("model", reply)]
        return reply

    def _stream(self, message, prompt):
        pieces = []
        for piece in self.lm.generate_stream(prompt, max_length=self.max_length):
            pieces.append(piece)
            yield piece
        self.turns += [("user", message), ("model", "".join(pieces))]

    def reset(self):
        self.turns = []

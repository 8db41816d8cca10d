"""Gemma's turn format: conversations for training, and multi-turn chat."""

_ROLES = {"user": "user", "model": "model", "assistant": "model"}


def conversation_turns(messages):
    """Validates `[{"role", "content"}, ...]`; returns `(role, text)` turns.

    `"assistant"` is read as `"model"`. A leading `"system"` message is
    folded into the first user turn, as Gemma's chat template does (Gemma has
    no system role). Turns must alternate, starting with the user.

    Example:
    >>> conversation_turns([{"role": "system", "content": "Be brief."},
    ...                     {"role": "user", "content": "Hi"},
    ...                     {"role": "assistant", "content": "Hello"}])
    [('user', 'Be brief.\\n\\nHi'), ('model', 'Hello')]
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            "A conversation must be a non-empty list of {'role', 'content'} messages. "
            f"Received: {messages!r}"
        )
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(
                f"Message {i} of a conversation must be a dict with 'role' and 'content'. "
                f"Received: {message!r}"
            )
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise TypeError(
                f"Message {i}'s 'content' must be a string; received {type(content).__name__}."
            )
        if role == "system" and i == 0:
            turns.append(("system", content))
            continue
        if role not in _ROLES:
            raise ValueError(
                f"Message {i} has the unknown role {role!r}: use 'user', 'model' (or "
                "'assistant'), and 'system' only as the first message."
            )
        turns.append((_ROLES[role], content))
    if turns[0][0] == "system":
        if len(turns) < 2 or turns[1][0] != "user":
            raise ValueError("A 'system' message must be followed by a 'user' message.")
        turns = [("user", f"{turns[0][1]}\n\n{turns[1][1]}")] + turns[2:]
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "model"):
            raise ValueError(
                "A conversation's turns must alternate user, model, user, ...; turn "
                f"{i} is {role!r}. Merge consecutive messages of the same role."
            )
    return turns


def turn_segments(turns, add_generation_prompt=False):
    """Gemma's template as `(text, is_reply)` pieces; `is_reply` marks what
    the model writes (its turns' text and `<end_of_turn>`), the loss targets.

    >>> turn_segments([("user", "Hi"), ("model", "Yo")])
    [('<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n', False), \
('Yo<end_of_turn>', True), ('\\n', False)]
    """
    segments = []

    def add(text, is_reply):
        # Merged neighbours tokenize as the prompt does at inference.
        if segments and segments[-1][1] == is_reply:
            segments[-1] = (segments[-1][0] + text, is_reply)
        else:
            segments.append((text, is_reply))

    for role, text in turns:
        if role not in ("user", "model"):
            raise ValueError(f"A chat turn's role must be 'user' or 'model'. Received {role!r}.")
        if role == "user":
            add(f"<start_of_turn>user\n{text}<end_of_turn>\n", False)
        else:
            add("<start_of_turn>model\n", False)
            add(f"{text}<end_of_turn>", True)
            add("\n", False)
    if add_generation_prompt:
        add("<start_of_turn>model\n", False)
    return segments


def format_turns(turns, add_generation_prompt=True):
    """Formats `(role, text)` turns as Gemma's chat template.

    Roles are `"user"` and `"model"`. The `<bos>` token is not included: the
    preprocessor adds it.

    Example:
    >>> format_turns([("user", "Hi!")])
    '<start_of_turn>user\\nHi!<end_of_turn>\\n<start_of_turn>model\\n'
    """
    return "".join(text for text, _ in turn_segments(turns, add_generation_prompt))


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

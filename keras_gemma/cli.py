"""`keras-gemma` / `python -m keras_gemma`: generate, chat, list and convert presets.

keras-gemma presets
keras-gemma generate --preset DIR_OR_NAME "Why is the sky blue?" --stream
keras-gemma chat --preset gemma_1.1_instruct_2b_en --backend torch --quantize int8
keras-gemma convert KERAS_PRESET_DIR HF_DIR --to huggingface
"""

import argparse
import os
import sys

BACKENDS = ("jax", "torch", "tensorflow")


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-gemma",
        description="Gemma language models in Keras 3.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = commands.add_parser("presets", help="list the known presets")
    presets.add_argument("--backend", choices=BACKENDS)

    def model_flags(command):
        command.add_argument(
            "--preset", required=True, help="preset name, local directory, kaggle:// or hf://"
        )
        command.add_argument(
            "--backend", choices=BACKENDS, help="Keras backend (default: $KERAS_BACKEND)"
        )
        command.add_argument("--dtype", help="weights dtype, e.g. bfloat16 or float32")
        command.add_argument("--quantize", choices=["int8"], help="quantize weights after loading")
        command.add_argument(
            "--max-length", type=_positive_int, default=256, help="total tokens, prompt included"
        )
        command.add_argument(
            "--sampler", default="greedy", choices=["greedy", "random", "top_k", "top_p", "beam"]
        )
        command.add_argument("--temperature", type=_positive_float, default=1.0)
        command.add_argument("--top-k", type=_positive_int, default=5)
        command.add_argument("--top-p", type=_probability, default=0.9)
        command.add_argument("--num-beams", type=_positive_int, default=4)
        command.add_argument("--seed", type=int, help="seed for sampling samplers")

    generate = commands.add_parser("generate", help="complete one or more prompts")
    model_flags(generate)
    generate.add_argument("prompts", nargs="+", help="prompt text")
    generate.add_argument(
        "--stream", action="store_true", help="print text as it is decoded (one prompt)"
    )
    chat = commands.add_parser("chat", help="interactive chat (instruction-tuned presets)")
    model_flags(chat)

    convert = commands.add_parser(
        "convert", help="convert between Keras preset and Hugging Face layouts"
    )
    convert.add_argument("source", help="preset name or directory (either layout)")
    convert.add_argument("destination", help="directory to write")
    convert.add_argument("--to", required=True, choices=["keras", "huggingface"], dest="layout")
    convert.add_argument("--backend", choices=BACKENDS)
    convert.add_argument("--dtype", help="weights dtype of the output")
    return parser


def _number(convert, valid, requirement):
    def parse(text):
        value = convert(text)
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'"
    return parse


_positive_int = _number(int, lambda value: value >= 1, "a positive integer")
_positive_float = _number(float, lambda value: value > 0, "positive")
_probability = _number(float, lambda value: 0 < value <= 1, "in (0, 1]")


def _sampler(args):
    from keras_gemma import samplers

    if args.sampler == "greedy":
        return samplers.GreedySampler()
    if args.sampler == "beam":
        return samplers.BeamSampler(num_beams=args.num_beams, temperature=args.temperature)
    kwargs = dict(seed=args.seed, temperature=args.temperature)
    if args.sampler == "top_k":
        return samplers.TopKSampler(k=args.top_k, **kwargs)
    if args.sampler == "top_p":
        return samplers.TopPSampler(p=args.top_p, **kwargs)
    return samplers.RandomSampler(**kwargs)


def _load(args):
    from keras_gemma import GemmaCausalLM

    lm = GemmaCausalLM.from_preset(args.preset, dtype=args.dtype)
    if args.quantize:
        lm.quantize(args.quantize)
    lm.compile(sampler=_sampler(args))
    return lm


def _presets(args):
    from keras_gemma.presets import PRESETS

    width = max(map(len, PRESETS))
    for name, entry in PRESETS.items():
        print(f"{name:<{width}}  {entry['params'] / 1e9:4.1f}B  {entry['description']}")


def _generate(args):
    lm = _load(args)
    if args.stream:
        if len(args.prompts) != 1:
            raise ValueError("--stream takes exactly one prompt.")
        for piece in lm.generate_stream(args.prompts[0], max_length=args.max_length):
            print(piece, end="", flush=True)
        print()
        return
    for text in lm.generate(args.prompts, max_length=args.max_length):
        print(text)


def _chat(args):
    from keras_gemma import ChatSession

    session = ChatSession(_load(args), max_length=args.max_length)
    print("Chatting; /reset clears the history, /quit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            print()
            return
        if message in ("/quit", "/exit"):
            return
        if message == "/reset":
            session.reset()
            continue
        if not message:
            continue
        for piece in session.send(message, stream=True):
            print(piece, end="", flush=True)
        print()


def _convert(args):
    from keras_gemma import GemmaCausalLM

    lm = GemmaCausalLM.from_preset(args.source, dtype=args.dtype)
    if args.layout == "keras":
        lm.save_to_preset(args.destination)
    else:
        lm.export_to_huggingface(args.destination)
    print(f"wrote {args.layout} layout to {args.destination}", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    backend = getattr(args, "backend", None)
    if backend and backend != os.environ.get("KERAS_BACKEND"):
        # Keras fixes its backend on import, and importing this package
        # imported Keras: start again with the backend set.
        env = dict(os.environ, KERAS_BACKEND=backend)
        os.execve(sys.executable, [sys.executable, "-m", "keras_gemma", *argv], env)
    handlers = {"presets": _presets, "generate": _generate, "chat": _chat, "convert": _convert}
    try:
        handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"keras-gemma: error: {error}", file=sys.stderr)
        return 1
    return 0

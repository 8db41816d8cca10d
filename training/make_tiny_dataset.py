"""Writes the tiny instruction-tuning dataset bundled for the demo.

The examples are templated facts (colors, sums, translations, ...) that a
tiny Gemma can learn in about a minute of CPU training, so samples before and
after fine-tuning look visibly different. The output is deterministic: running
the script twice writes byte-identical files.

Usage:
    python training/make_tiny_dataset.py [OUTPUT_DIR]

Writes `tiny_sft.jsonl` (one `{"prompt": ..., "response": ...}` per line) and
`tiny_corpus.txt` (one "prompt response" line per example, used to train the
tiny vocabulary) into OUTPUT_DIR, which defaults to `training/data/`.
"""

import json
import pathlib
import random
import sys

DEFAULT_OUTPUT_DIR = pathlib.Path(__file__).resolve().parent / "data"

COLORS = {
    "banana": "yellow",
    "lemon": "yellow",
    "strawberry": "red",
    "tomato": "red",
    "cherry": "red",
    "carrot": "orange",
    "orange": "orange",
    "pumpkin": "orange",
    "lime": "green",
    "cucumber": "green",
    "frog": "green",
    "leaf": "green",
    "grape": "purple",
    "plum": "purple",
    "sky": "blue",
    "blueberry": "blue",
    "crow": "black",
    "coal": "black",
    "cloud": "white",
    "snowball": "white",
    "swan": "white",
    "chocolate bar": "brown",
    "coconut": "brown",
    "flamingo": "pink",
}

ANIMAL_SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "horse": "neigh",
    "owl": "hoot",
    "lion": "roar",
    "snake": "hiss",
    "mouse": "squeak",
    "bee": "buzz",
    "frog": "ribbit",
    "rooster": "cock-a-doodle-doo",
    "donkey": "hee-haw",
}

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "China": "Beijing",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Chile": "Santiago",
    "Cuba": "Havana",
}

# English word -> (French, Spanish).
TRANSLATIONS = {
    "cat": ("chat", "gato"),
    "dog": ("chien", "perro"),
    "house": ("maison", "casa"),
    "water": ("eau", "agua"),
    "bread": ("pain", "pan"),
    "book": ("livre", "libro"),
    "sun": ("soleil", "sol"),
    "moon": ("lune", "luna"),
    "apple": ("pomme", "manzana"),
    "tree": ("arbre", "árbol"),
    "car": ("voiture", "coche"),
    "friend": ("ami", "amigo"),
    "milk": ("lait", "leche"),
    "red": ("rouge", "rojo"),
    "green": ("vert", "verde"),
    "thank you": ("merci", "gracias"),
    "hello": ("bonjour", "hola"),
    "cheese": ("fromage", "queso"),
    "sea": ("mer", "mar"),
    "school": ("école", "escuela"),
}

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "day": "night",
    "happy": "sad",
    "old": "new",
    "open": "closed",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "loud": "quiet",
    "wet": "dry",
    "hard": "soft",
    "left": "right",
    "tall": "short",
    "win": "lose",
    "push": "pull",
}

NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]


def _article(noun):
    return "An" if noun[0] in "aeiou" else "A"


def make_examples():
    """Returns the dataset as a list of `(prompt, response)` pairs."""
    examples = []
    for thing, color in COLORS.items():
        examples.append(
            (
                f"What color is a {thing}?",
                f"{_article(thing)} {thing} is {color}.",
            )
        )
    for animal, sound in ANIMAL_SOUNDS.items():
        examples.append((f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    for country, city in CAPITALS.items():
        examples.append(
            (
                f"What is the capital of {country}?",
                f"The capital of {country} is {city}.",
            )
        )
    for word, (french, spanish) in TRANSLATIONS.items():
        examples.append((f"Translate {word} to French.", french))
        examples.append((f"Translate {word} to Spanish.", spanish))
    for word, opposite in OPPOSITES.items():
        examples.append(
            (
                f"What is the opposite of {word}?",
                f"The opposite of {word} is {opposite}.",
            )
        )
    for a in range(10):
        for b in range(10):
            examples.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for a in range(10):
        for b in range(a + 1):
            examples.append((f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."))
    for n in range(1, 100, 3):
        examples.append((f"What number comes after {n}?", f"{n + 1} comes after {n}."))
    for digit, word in enumerate(NUMBER_WORDS):
        examples.append((f"Spell the number {digit}.", word))
    # A fixed seed keeps the file stable while mixing tasks, so a
    # train/validation split by position still sees every kind of example.
    random.Random(1234).shuffle(examples)
    return examples


def main(argv):
    output_dir = pathlib.Path(argv[1]) if len(argv) > 1 else DEFAULT_OUTPUT_DIR
    output_dir.mkdir(parents=True, exist_ok=True)
    examples = make_examples()
    # newline="\n" so the files are identical on every platform.
    with open(output_dir / "tiny_sft.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for prompt, response in examples:
            record = {"prompt": prompt, "response": response}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(output_dir / "tiny_corpus.txt", "w", encoding="utf-8", newline="\n") as f:
        for prompt, response in examples:
            f.write(f"{prompt} {response}\n")
    print(f"Wrote {len(examples)} examples to {output_dir}")


if __name__ == "__main__":
    main(sys.argv)

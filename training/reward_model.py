"""Trains a Bradley–Terry reward model on preference pairs.

Usage:

    python training/reward_model.py --preset PRESET --data pairs.jsonl --output runs/rm \
        [--validation-data held_out.jsonl] [--lora-rank 8] [--backend jax] \
        [--steps 300] [--batch-size 16] [--learning-rate 1e-4] [--sequence-length 96] \
        [--center-rewards-coefficient 0.01]

    # A real preset with LoRA (the head trains fully, the backbone through adapters):
    python training/reward_model.py --preset gemma_2b_en --lora-rank 8 --dtype bfloat16 \
        --data pairs.jsonl --output runs/rm_2b

`--preset` is any Gemma preset (usually the SFT model, e.g. `runs/sft/preset`),
which gets a fresh reward head, or a reward model saved by this script. `--data`
is JSONL, one pair a line, in any of:

    {"prompt": "Q", "chosen": "good answer", "rejected": "bad answer"}
    {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
     "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]}

with an optional "margin" (a number: how much better chosen is). Pairs are
written in Gemma's turn format as `sft.py` writes its examples, so the reward
model scores exactly the token layout the policy produces. The loss is
`-log σ(r_chosen - r_rejected - margin)`; the log has `accuracy` (pairs ranked
right), `margin` and `mean_reward`. Writes `preset/` (with
`reward_head.safetensors`), `log.csv`, `curves.png` and, with
`--validation-data`, `validation.json` into `--output`; rerunning after a kill
resumes from the last epoch's backup.
"""

import argparse
import json
import pathlib

import recipe_common  # sets the backend from --backend before Keras loads

import keras_gemma
from keras_gemma.alignment.preferences import check_preferences
from keras_gemma.alignment.reward_model import GemmaRewardModel
from keras_gemma.chat import conversation_turns


def add_preference_arguments(parser):
    """The flags the reward-model and DPO recipes share."""
    parser.add_argument("--preset", required=True, help="preset name, handle or directory")
    parser.add_argument("--data", type=pathlib.Path, required=True, help="JSONL pairs")
    parser.add_argument("--validation-data", type=pathlib.Path, help="held-out JSONL pairs")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: train every weight")
    parser.add_argument(
        "--lora-targets",
        default="query,value",
        help="comma-separated projections that get adapters (with --lora-rank)",
    )
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the preset's)")
    return parser


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    recipe_common.add_common_arguments(parser, steps=300, batch_size=16, learning_rate=1e-4)
    add_preference_arguments(parser)
    parser.add_argument(
        "--center-rewards-coefficient",
        type=float,
        default=None,
        help="adds c * mean((r_chosen + r_rejected)^2), keeping rewards near 0 (TRL: 0.01)",
    )
    return parser.parse_args(argv)


def _turns(messages, line_number):
    try:
        return conversation_turns(messages)
    except (TypeError, ValueError) as error:
        raise ValueError(f"line {line_number}: {error}") from None


def _pair(row, line_number):
    """`(prompt, chosen, rejected)` in Gemma's turn format, as `sft.py` writes them."""
    if not isinstance(row, dict) or not {"chosen", "rejected"} <= set(row):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(
            f"line {line_number}: a preference pair needs 'chosen' and 'rejected' (and "
            f"'prompt' for plain text); found {found}"
        )
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        prefix = row.get("prompt") or []
        if isinstance(prefix, str):
            prefix = [{"role": "user", "content": prefix}]
        chosen_turns = _turns(prefix + chosen, line_number)
        rejected_turns = _turns(prefix + rejected, line_number)
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise ValueError(
                f"line {line_number}: 'chosen' and 'rejected' must share every turn but the "
                "last (the two answers being compared)"
            )
        if chosen_turns[-1][0] != "model" or rejected_turns[-1][0] != "model":
            raise ValueError(f"line {line_number}: both conversations must end on a model turn")
        prompt, chosen, rejected = chosen_turns[:-1], chosen_turns[-1][1], rejected_turns[-1][1]
    elif "prompt" in row:
        prompt = [("user", row["prompt"])]
    else:
        raise ValueError(
            f"line {line_number}: plain-text pairs need a 'prompt' (or give 'chosen' and "
            "'rejected' as conversations)"
        )
    if not all(isinstance(text, str) for text in (chosen, rejected)):
        raise ValueError(f"line {line_number}: 'chosen' and 'rejected' must be strings")
    return keras_gemma.format_turns(prompt), chosen + "<end_of_turn>", rejected + "<end_of_turn>"


def read_preference_data(path):
    """A JSONL file of pairs as checked `{"prompts", "chosen", "rejected"[, "margin"]}`."""
    columns = {"prompts": [], "chosen": [], "rejected": [], "margin": []}
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key, value in zip(("prompts", "chosen", "rejected"), _pair(row, line_number)):
                columns[key].append(value)
            columns["margin"].append(row.get("margin"))
    if not columns["chosen"]:
        raise ValueError(f"{path} has no preference pairs.")
    margins = columns.pop("margin")
    if any(m is not None for m in margins):
        if any(m is None for m in margins):
            raise ValueError(f"{path}: give a 'margin' on every line or on none.")
        columns["margin"] = margins
    return check_preferences(columns)


def enable_lora(model, args):
    if args.lora_rank:
        model.backbone.enable_lora(args.lora_rank, target_layer_names=args.lora_targets.split(","))


def main(argv=None, callbacks=()):
    """Runs the recipe; `callbacks` are extra Keras callbacks for `fit` (tests use them)."""
    args = parse_args(argv)
    preset = args.output / "preset"
    if (preset / "reward_head.safetensors").exists():
        print(f"{preset} exists: the reward model is trained (delete it to train again).")
        return preset
    recipe_common.seed_everything(args.seed)
    cluster = recipe_common.setup_distribution(args.model_parallel)
    data = read_preference_data(args.data)
    kwargs = {"sequence_length": args.sequence_length}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    model = GemmaRewardModel.from_preset(args.preset, **kwargs)
    model.center_rewards_coefficient = args.center_rewards_coefficient
    enable_lora(model, args)
    print(
        f"reward model: {recipe_common.model_summary_line(model)} pairs={len(data['chosen'])} "
        f"trainable={recipe_common.trainable_count(model):,}"
    )
    recipe_common.train(model, data, model.preprocess, args, cluster, callbacks, "training")
    if args.validation_data is not None:
        held_out = read_preference_data(args.validation_data)
        recipe_common.evaluate_held_out(model, held_out, args, cluster)
    recipe_common.save_result(model, args, cluster, preset)
    return preset


if __name__ == "__main__":
    main()

"""Direct preference optimisation of a Gemma policy on preference pairs.

Usage:

    python training/dpo.py --preset runs/sft/preset --data pairs.jsonl --output runs/dpo \
        [--validation-data held_out.jsonl] [--beta 0.1] [--lora-rank 8] \
        [--reference auto|precompute] [--backend jax] [--steps 200] [--batch-size 16] \
        [--learning-rate 1e-4] [--sequence-length 96]

    # A real preset with LoRA: the reference is the policy with its adapters off.
    python training/dpo.py --preset gemma_2b_en --lora-rank 8 --dtype bfloat16 \
        --data pairs.jsonl --output runs/dpo_2b

`--data` has the reward-model recipe's JSONL pairs (`training/reward_model.py`),
written in Gemma's turn format as `sft.py` writes its examples. The loss is
`-log σ(β[(log π_c - log π_ref,c) - (log π_r - log π_ref,r)])` over each
answer's tokens and its `<end_of_turn>`; the log has TRL's `rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen` and
`logps/rejected`.

The reference is the starting policy. `--reference auto`: with `--lora-rank`,
the policy with its adapters switched off (no second copy of the weights);
without, a frozen copy (twice the weights in memory). `--reference precompute`
scores every pair with the starting policy once before training and keeps no
reference model at all (TRL's `precompute_ref_log_probs`).

Writes `preset/` (the policy, LoRA merged), `log.csv`, `curves.png` and, with
`--validation-data`, `validation.json` into `--output`; rerunning after a kill
resumes from the last epoch's backup (the reference is the preset again).
"""

import argparse
import time

import recipe_common  # sets the backend from --backend before Keras loads
import reward_model as preference_recipe

import keras_gemma
from keras_gemma.alignment.dpo import GemmaDPO


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    recipe_common.add_common_arguments(parser, steps=200, batch_size=16, learning_rate=1e-4)
    preference_recipe.add_preference_arguments(parser)
    parser.add_argument("--beta", type=float, default=0.1, help="KL strength (TRL: 0.1)")
    parser.add_argument(
        "--reference",
        choices=("auto", "precompute"),
        default="auto",
        help="auto: adapters off with LoRA, else a frozen copy; precompute: score the "
        "pairs with the starting policy once, keep no reference model",
    )
    return parser.parse_args(argv)


def main(argv=None, callbacks=()):
    """Runs the recipe; `callbacks` are extra Keras callbacks for `fit` (tests use them)."""
    args = parse_args(argv)
    preset = args.output / "preset"
    if (preset / "model.weights.h5").exists():
        print(f"{preset} exists: DPO is done (delete it to train again).")
        return preset
    recipe_common.seed_everything(args.seed)
    cluster = recipe_common.setup_distribution(args.model_parallel)
    data = preference_recipe.read_preference_data(args.data)
    held_out = None
    if args.validation_data is not None:
        held_out = preference_recipe.read_preference_data(args.validation_data)
    kwargs = {"sequence_length": args.sequence_length}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    policy = keras_gemma.GemmaCausalLM.from_preset(args.preset, **kwargs)
    # Adapters first: the reference is then the policy with them off.
    preference_recipe.enable_lora(policy, args)
    if args.reference == "precompute":
        dpo = GemmaDPO(policy, beta=args.beta, reference=None)
        start = time.perf_counter()
        data = dpo.precompute_reference_log_probs(data, args.batch_size)
        if held_out is not None:
            held_out = dpo.precompute_reference_log_probs(held_out, args.batch_size)
        print(f"reference log-probabilities: {time.perf_counter() - start:.0f}s")
    else:
        dpo = GemmaDPO(policy, beta=args.beta)
    print(
        f"DPO: {recipe_common.model_summary_line(policy)} pairs={len(data['chosen'])} "
        f"beta={args.beta} reference={args.reference} "
        f"trainable={recipe_common.trainable_count(dpo):,}"
    )
    recipe_common.train(dpo, data, dpo.preprocess, args, cluster, callbacks, "training")
    if held_out is not None:
        recipe_common.evaluate_held_out(dpo, held_out, args, cluster)
    recipe_common.save_result(policy, args, cluster, preset)
    return preset


if __name__ == "__main__":
    main()

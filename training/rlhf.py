"""RLHF of a Gemma policy: REINFORCE leave-one-out (the Gemma paper's
recipe) or GRPO, with a KL penalty toward the starting (SFT) policy.

Usage:

    python training/rlhf.py --preset runs/sft/preset --prompts prompts.jsonl \
        --reward runs/rm/preset --output runs/rlhf \
        [--algorithm rloo|grpo] [--num-generations 4] [--max-new-tokens 24] \
        [--temperature 1.0] [--kl-coefficient 0.05] [--target-kl 6] [--max-kl 50] \
        [--lora-rank 8] [--backend jax] [--steps 200] [--steps-per-epoch 20] \
        [--batch-size 32] [--learning-rate 1e-5]

    # A programmatic reward instead of a reward model (the toy tasks' checker):
    python training/rlhf.py --preset runs/sft/preset --prompts train.jsonl \
        --reward toy_tasks:reward --output runs/rlhf_checker

    # A real preset with LoRA: the reference is the policy with adapters off.
    python training/rlhf.py --preset gemma_2b_en --lora-rank 8 --dtype bfloat16 \
        --prompts prompts.jsonl --reward runs/rm_2b/preset --output runs/rlhf_2b

`--prompts` is JSONL, one prompt a line: `{"prompt": "..."}`, `{"question":
"..."}` (as `toy_tasks.py` writes) or `{"messages": [...]}` ending on a user
turn; each is put in Gemma's turn format, as `sft.py` trains on it.
`--reward` is a reward model saved by `training/reward_model.py` (a
directory) or `module:function`, a Python callable `reward(prompts,
completions) -> floats` importable from `training/` or the path.

Each step samples `--num-generations` completions for each of `--batch-size
/ --num-generations` prompts, rewards them, and takes one optimizer step
(`keras_gemma.alignment.GemmaPolicyOptimizer`); `--batch-size` counts
completions, as in TRL. `--target-kl` adapts the KL coefficient toward that
many nats per sequence (Ziegler et al. 2019); `--max-kl` stops training,
restoring the last good weights, when the KL passes it (NaN losses too).

Writes `preset/` (the policy, LoRA merged), `log.csv` (TRL's names: reward,
reward_std, kl, entropy, completions/mean_length, ...), `curves.png` and
`samples.txt` (a few prompts' completions at each epoch end) into
`--output`. Rerunning after a kill resumes from the last epoch's backup: each
step's prompts and sampling seed follow from `--seed` and the step number, so
the resumed run takes the same steps as an uninterrupted one.
"""

import argparse
import importlib
import json
import pathlib

import recipe_common  # sets the backend from --backend before Keras loads
import reward_model as preference_recipe
from recipe_common import keras

import keras_gemma
from keras_gemma.alignment import callbacks as alignment_callbacks
from keras_gemma.alignment.reward_model import GemmaRewardModel
from keras_gemma.alignment.rloo import GemmaPolicyOptimizer
from keras_gemma.chat import conversation_turns


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    recipe_common.add_common_arguments(parser, steps=200, batch_size=32, learning_rate=1e-5)
    parser.set_defaults(weight_decay=0.0, warmup_steps=0, steps_per_epoch=20)
    parser.add_argument("--preset", required=True, help="the starting policy (the SFT model)")
    parser.add_argument("--prompts", type=pathlib.Path, required=True, help="JSONL prompts")
    parser.add_argument(
        "--reward", required=True, help="a reward-model preset directory, or module:function"
    )
    parser.add_argument("--algorithm", choices=("rloo", "grpo"), default="rloo")
    parser.add_argument("--num-generations", type=int, default=4, help="samples per prompt, k")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kl-coefficient", type=float, default=0.05, help="beta")
    parser.add_argument(
        "--target-kl", type=float, default=None, help="adapt beta toward this KL (nats/sequence)"
    )
    parser.add_argument(
        "--max-kl", type=float, default=None, help="stop (keeping the last good weights) above it"
    )
    parser.add_argument("--num-updates", type=int, default=1, help="optimizer steps per rollout")
    parser.add_argument("--truncation-penalty", type=float, default=None)
    parser.add_argument("--lora-rank", type=int, default=0, help="0: train every weight")
    parser.add_argument("--lora-targets", default="query,value")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the preset's)")
    parser.add_argument("--samples", type=int, default=4, help="prompts shown in samples.txt")
    return parser.parse_args(argv)


def read_prompts(path):
    """Prompts in Gemma's turn format from a JSONL file, checked line by line."""
    prompts = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object per line")
            if "messages" in row:
                try:
                    turns = conversation_turns(row["messages"])
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{path}:{line_number}: {error}") from None
                if turns[-1][0] != "user":
                    raise ValueError(
                        f"{path}:{line_number}: a prompt's messages must end on a user turn "
                        "(the policy writes the model's reply)"
                    )
            else:
                text = row.get("prompt", row.get("question"))
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(
                        f"{path}:{line_number}: each line needs a non-empty 'prompt' or "
                        f"'question' string, or 'messages'; found {sorted(row)}"
                    )
                turns = [("user", text)]
            prompts.append(keras_gemma.format_turns(turns))
    if not prompts:
        raise ValueError(f"{path} has no prompts.")
    return prompts


def load_reward(spec, dtype=None):
    """A reward-model directory, or `module:function`."""
    if pathlib.Path(spec).is_dir():
        return GemmaRewardModel.from_preset(spec, **({"dtype": dtype} if dtype else {}))
    module_name, _, name = spec.partition(":")
    if not name:
        raise SystemExit(
            f"--reward {spec!r} is neither a directory nor module:function (e.g. toy_tasks:reward)."
        )
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"--reward {spec!r}: {error}") from None
    if not callable(function):
        raise SystemExit(f"--reward {spec!r} is not callable.")
    return function


class SampleLog(keras.callbacks.Callback):
    """Appends a few prompts' completions from the latest rollout to a file
    at each epoch end, so a run can be read, not only plotted."""

    def __init__(self, path, count):
        super().__init__()
        self.path, self.count = pathlib.Path(path), count

    def on_epoch_end(self, epoch, logs=None):
        rollout = self.model.last_rollout
        if not rollout or not self.count:
            return
        lines = [f"=== epoch {epoch + 1}"]
        for prompt, completion, reward in list(
            zip(rollout["prompts"], rollout["completions"], rollout["rewards"])
        )[: self.count]:
            # The first user turn's first line, without the template around it.
            question = prompt.split("\n")[1] if "\n" in prompt else prompt
            question = question.removesuffix("<end_of_turn>")
            lines.append(f"{question!r} -> {completion!r} (reward {reward:.3f})")
        with open(self.path, "a", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")


def main(argv=None, callbacks=()):
    """Runs the recipe; `callbacks` are extra Keras callbacks for `fit` (tests use them)."""
    args = parse_args(argv)
    preset = args.output / "preset"
    if (preset / "model.weights.h5").exists():
        print(f"{preset} exists: RLHF is done (delete it to train again).")
        return preset
    recipe_common.seed_everything(args.seed)
    cluster = recipe_common.setup_distribution(args.model_parallel)
    if cluster.world_size > 1:
        raise SystemExit("rlhf.py runs in one process (JAX --model-parallel shards the model).")
    prompts = read_prompts(args.prompts)
    reward = load_reward(args.reward, args.dtype)
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    policy = keras_gemma.GemmaCausalLM.from_preset(args.preset, **kwargs)
    # Adapters first: the reference is then the policy with them off.
    preference_recipe.enable_lora(policy, args)
    trainer = GemmaPolicyOptimizer(
        policy,
        reward,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        kl_coefficient=args.kl_coefficient,
        algorithm=args.algorithm,
        num_updates=args.num_updates,
        truncation_penalty=args.truncation_penalty,
        seed=args.seed,
    )
    trainer.compile(
        optimizer=recipe_common.make_optimizer(
            args.learning_rate, args.steps, args.warmup_steps, args.weight_decay
        )
    )
    print(
        f"RLHF ({args.algorithm}): {recipe_common.model_summary_line(policy)} "
        f"prompts={len(prompts)} k={args.num_generations} reward={args.reward} "
        f"trainable={recipe_common.trainable_count(trainer):,}"
    )
    safety = []
    if args.target_kl is not None:
        safety.append(
            alignment_callbacks.AdaptiveKLController(
                target=args.target_kl, horizon=10 * args.batch_size * args.steps_per_epoch
            )
        )
    # On by default for NaN losses; with --max-kl, also on the KL.
    safety.append(alignment_callbacks.StopOnDivergence(max_kl=args.max_kl))
    recipe_common.fit_resumable(
        trainer,
        prompts,
        args.output,
        args.steps,
        args.steps_per_epoch,
        cluster,
        args.verbose,
        [*safety, SampleLog(args.output / "samples.txt", args.samples), *callbacks],
        batch_size=args.batch_size,
    )
    recipe_common.save_result(policy, args, cluster, preset)
    return preset


if __name__ == "__main__":
    main()

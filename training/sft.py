"""Supervised fine-tuning in Gemma's turn format, loss on the model's turns only.

Usage:

    python training/sft.py --preset PRESET --data train.jsonl --output runs/sft \
        [--lora-rank 8] [--backend jax] [--steps 500] [--batch-size 32]
        [--learning-rate 1e-3] [--sequence-length 64] [--model-parallel N]

    # A real preset, LoRA, 2B weights split over 8 devices (JAX):
    python training/sft.py --preset gemma_2b_en --lora-rank 8 --dtype bfloat16 \
        --model-parallel 8 --data train.jsonl --output runs/sft_2b
    # Data parallel on PyTorch:
    torchrun --nproc_per_node=2 training/sft.py --backend torch --preset ... --data ...

`--preset` is a preset name, `kaggle://`/`hf://` handle, or a directory (e.g.
`runs/pretrain/preset`). `--data` is JSONL, one example a line, in any of:

    {"messages": [{"role": "user", "content": "Q"}, {"role": "model", "content": "A"}]}
    {"prompt": "Q", "response": "A"}       {"question": "Q", "answer": "A"}

Each example is formatted with Gemma's template (`keras_gemma.format_turns`);
the loss covers the final model turn and its `<end_of_turn>`, not the prompt.
With `--lora-rank`, only rank-r adapters train; they are saved to
`adapter.lora.safetensors` and merged into `preset/`. Writes `preset/`,
`log.csv`, `curves.png` into `--output`; rerunning after a kill resumes from
the last epoch's backup and ends with the same weights.
"""

import argparse
import json
import pathlib
import time

import recipe_common  # sets the backend from --backend before Keras loads
from recipe_common import np

import keras_gemma


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    recipe_common.add_common_arguments(parser, steps=500, batch_size=32, learning_rate=1e-3)
    parser.add_argument("--preset", required=True, help="preset name, handle or directory")
    parser.add_argument("--data", type=pathlib.Path, required=True, help="JSONL examples")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: train every weight")
    parser.add_argument(
        "--lora-targets",
        default="query,value",
        help="comma-separated projections that get adapters (with --lora-rank)",
    )
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the preset's)")
    return parser.parse_args(argv)


ROLES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}


def conversation_turns(row, line_number):
    """`(role, text)` turns of one JSONL example, whatever its layout."""
    if "messages" in row:
        turns = [(ROLES.get(m.get("role")), m.get("content")) for m in row["messages"]]
        if any(role is None for role, _ in turns):
            raise ValueError(f"line {line_number}: a role is not user, model or assistant")
        # Gemma has no system turn: its template folds one into the first user turn.
        if turns and turns[0][0] == "system" and len(turns) > 1:
            turns = [("user", f"{turns[0][1]}\n\n{turns[1][1]}")] + turns[2:]
    elif "prompt" in row and "response" in row:
        turns = [("user", row["prompt"]), ("model", row["response"])]
    elif "question" in row and "answer" in row:
        turns = [("user", row["question"]), ("model", row["answer"])]
    else:
        raise ValueError(
            f"line {line_number}: expected 'messages', 'prompt'/'response' or "
            f"'question'/'answer'; found {sorted(row)}"
        )
    if not turns or turns[-1][0] != "model":
        raise ValueError(f"line {line_number}: the conversation must end on a model turn")
    return turns


def read_sft_data(path):
    """A JSONL file as `{"prompts", "responses"}` in Gemma's turn format.

    The prompt is every turn before the last model turn plus the opening of
    the model's turn; the response is that turn's text and `<end_of_turn>`,
    so the preprocessor puts the loss on the model's answer only.
    """
    prompts, responses = [], []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            turns = conversation_turns(json.loads(line), line_number)
            prompts.append(keras_gemma.format_turns(turns[:-1]))
            responses.append(turns[-1][1] + "<end_of_turn>")
    if not prompts:
        raise ValueError(f"{path} has no examples.")
    return {"prompts": prompts, "responses": responses}


def load_model(args):
    kwargs = {"sequence_length": args.sequence_length}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    return keras_gemma.GemmaCausalLM.from_preset(args.preset, **kwargs)


def main(argv=None, callbacks=()):
    """Runs the recipe; `callbacks` are extra Keras callbacks for `fit` (tests use them)."""
    args = parse_args(argv)
    preset = args.output / "preset"
    if (preset / "model.weights.h5").exists():
        print(f"{preset} exists: fine-tuning is done (delete it to train again).")
        return preset
    recipe_common.seed_everything(args.seed)
    cluster = recipe_common.setup_distribution(args.model_parallel)
    data = read_sft_data(args.data)
    lm = load_model(args)
    if args.lora_rank:
        lm.backbone.enable_lora(args.lora_rank, target_layer_names=args.lora_targets.split(","))
    lm.compile(
        optimizer=recipe_common.make_optimizer(
            args.learning_rate, args.steps, args.warmup_steps, args.weight_decay
        )
    )
    print(
        f"fine-tuning: {recipe_common.model_summary_line(lm)} examples={len(data['prompts'])} "
        f"trainable={sum(int(np.prod(v.shape)) for v in lm.trainable_variables):,}"
    )
    batches = recipe_common.StepBatches(
        data,
        lm.preprocessor,
        args.batch_size,
        args.steps_per_epoch,
        args.seed,
        cluster.rank,
        cluster.world_size,
    )
    start = time.perf_counter()
    recipe_common.fit_resumable(
        lm, batches, args.output, args.steps, cluster, args.verbose, callbacks
    )
    print(f"fine-tuning took {time.perf_counter() - start:.0f}s (this run)")
    if cluster.is_chief:
        if args.lora_rank:
            lm.backbone.save_lora_weights(str(args.output / "adapter.lora.safetensors"))
            lm.backbone.merge_lora()  # the saved preset serves without adapters
        lm.save_to_preset(preset)
        recipe_common.finish(args.output)
        print(f"saved {preset}")
    return preset


if __name__ == "__main__":
    main()

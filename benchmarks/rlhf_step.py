"""One RLHF step (`GemmaPolicyOptimizer`, RLOO) split into generate / score /
update, and rollout generation beside plain `generate`.

    python benchmarks/rlhf_step.py                          # torch, small config
    python benchmarks/rlhf_step.py --backend jax --runs 5
    python benchmarks/rlhf_step.py --config 2b --lora-rank 8 --dtype bfloat16

Small config (from the project's issues): vocabulary 32000, 6 layers, 8
query heads, 1 key/value head, hidden 512, intermediate 4096, head dim 64.
`--config 2b` is Gemma 2B's architecture (random weights; with `--lora-rank`
only the adapters train and the reference is the same weights with adapters
off). A step: `--prompts` prompts of `--prompt-length` tokens, `--k` samples
each, `--new-tokens` new tokens (no end token is ever sampled early here: a
random model, so every completion has full length).

- generate: the rollout's sampling (`RandomSampler`, prompts × k rows, one
  prefill per prompt);
- score: policy and reference log-probabilities of the completions, the
  reward (a NumPy function of the token ids) and the advantages;
- update: one optimizer step on the rollout (`train_on_batch`).

"plain generate" is `GemmaCausalLM.generate_tokens` with the greedy sampler
on the prompts repeated k times (k prefills of each). Prompts are token ids written as text ("17
305 ..."), through a stand-in tokenizer, so any vocabulary size works and
the whole `rollout` path runs. Medians of `--runs` steps after a warm-up
step (compilation included), reported as "first step".
"""

import argparse
import json
import os
import statistics
import time

from _machine import describe_cpu
from fit_speed import CONFIG as SMALL  # the issues' small config, defined once

CONFIGS = ("small", "2b")


class IdTokenizer:
    """Token ids written as space-separated integers: a tokenizer for any vocabulary."""

    pad_token_id, end_token_id, start_token_id, end_of_turn_id = 0, 1, 2, None

    def tokenize(self, texts):
        return [[int(t) for t in text.split()] for text in texts]

    def detokenize(self, ids):
        return " ".join(str(int(i)) for i in ids)


def even_fraction(prompts, completions):
    """The reward: the fraction of even token ids in each completion."""
    rewards = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        rewards.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return rewards


def run(args):
    import keras
    import numpy as np

    from keras_gemma import GemmaBackbone
    from keras_gemma import GemmaCausalLM
    from keras_gemma import GemmaCausalLMPreprocessor
    from keras_gemma import samplers
    from keras_gemma.alignment.rloo import GemmaPolicyOptimizer
    from keras_gemma.presets import preset_config

    keras.utils.set_random_seed(0)
    config = SMALL if args.config == "small" else preset_config("gemma_2b_en").to_dict()
    backbone = GemmaBackbone(**config, dtype=args.dtype)
    if args.lora_rank:
        backbone.enable_lora(args.lora_rank)
    width = args.prompt_length + args.new_tokens
    preprocessor = GemmaCausalLMPreprocessor(IdTokenizer(), sequence_length=width)
    lm = GemmaCausalLM(backbone, preprocessor)
    rng = np.random.default_rng(0)
    prompts = [
        " ".join(map(str, rng.integers(3, config["vocabulary_size"], args.prompt_length - 1)))
        for _ in range(args.prompts)
    ]
    trainer = GemmaPolicyOptimizer(
        lm, even_fraction, num_generations=args.k, max_new_tokens=args.new_tokens, seed=0
    )
    trainer.compile(optimizer=keras.optimizers.SGD(1e-4))

    timings = {"generate": [], "score": [], "update": [], "plain generate": []}
    generator = lm.generator  # the engine the rollout samples through
    generate = generator.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        timings["generate"].append(time.perf_counter() - start)
        return out

    generator.generate = timed_generate  # an instance attribute: this run only
    # The policy keeps the rollout sampler (as during `fit`), so rollouts
    # reuse their compiled loop; the greedy calls have their own cache key
    # (no stop tokens, one sample per row).
    greedy = samplers.GreedySampler()
    lm.sampler = saved_sampler = trainer.sampler
    batch = preprocessor.generate_preprocess(prompts, sequence_length=width)
    repeated = {k: np.repeat(v, args.k, axis=0) for k, v in batch.items()}
    first = None
    for step in range(args.runs + 1):
        start = time.perf_counter()
        rollout = trainer.rollout(prompts, width)
        rollout_s = time.perf_counter() - start
        timings["score"].append(rollout_s - timings["generate"][-1])
        start = time.perf_counter()
        trainer.train_on_batch(rollout)
        timings["update"].append(time.perf_counter() - start)
        start = time.perf_counter()
        # The unwrapped engine: k prefills of each prompt, greedy, no stop.
        lm.sampler = greedy
        generate(repeated["token_ids"], repeated["padding_mask"], ())
        lm.sampler = saved_sampler
        timings["plain generate"].append(time.perf_counter() - start)
        if step == 0:
            first = {k: v[0] for k, v in timings.items()}
    new_tokens = args.prompts * args.k * args.new_tokens
    medians = {k: statistics.median(v[1:]) for k, v in timings.items()}
    step_s = medians["generate"] + medians["score"] + medians["update"]
    return {
        "backend": keras.config.backend(),
        "config": args.config,
        "dtype": args.dtype,
        "lora_rank": args.lora_rank,
        "batch": f"{args.prompts} prompts x {args.k} samples, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens",
        "median_s": {k: round(v, 3) for k, v in medians.items()},
        "first_step_s": {k: round(v, 2) for k, v in first.items()},
        "step_s": round(step_s, 3),
        "share": {k: f"{medians[k] / step_s:.0%}" for k in ("generate", "score", "update")},
        "rollout_tokens_per_s": round(new_tokens / medians["generate"], 1),
        "plain_generate_tokens_per_s": round(new_tokens / medians["plain generate"], 1),
        "step_tokens_per_s": round(new_tokens / step_s, 1),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["jax", "torch", "tensorflow"], default="torch")
    parser.add_argument("--config", choices=CONFIGS, default="small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend  # before anything imports Keras
    results = run(args)
    print(describe_cpu())
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Per-task pairwise accuracy on preference pairs, of a reward model and of
the policy's own likelihood (what the policy itself knows of right from wrong).

    KERAS_BACKEND=jax python benchmarks/reward_pairs.py --pairs runs/toy/pairs/heldout.jsonl \
        --reward-model runs/toy/reward_model/preset --policy runs/toy/sft/preset

`--pairs` is JSONL as `training/preference_pairs.py` writes it (`prompt`,
`chosen`, `rejected`, `task`). A pair counts as ranked right when the reward
model scores `chosen` above `rejected`, and for `--policy` when the policy's
summed log-probability of `chosen` is above that of `rejected`.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "training"))
from reward_model import read_preference_data  # noqa: E402

import keras_gemma  # noqa: E402
from keras_gemma.alignment.policy import completion_log_probs  # noqa: E402
from keras_gemma.alignment.preferences import preference_batch  # noqa: E402
from keras_gemma.alignment.reward_model import GemmaRewardModel  # noqa: E402


def reward_model_scores(preset, data, sequence_length):
    model = GemmaRewardModel.from_preset(preset, sequence_length=sequence_length)
    batch = preference_batch(model.preprocessor, data)
    return [
        np.ravel(
            model.predict(
                {"token_ids": batch[f"{side}_token_ids"],
                 "padding_mask": batch[f"{side}_padding_mask"]},
                batch_size=128, verbose=0,
            )
        )
        for side in ("chosen", "rejected")
    ]  # fmt: skip


def policy_scores(preset, data, sequence_length):
    lm = keras_gemma.GemmaCausalLM.from_preset(preset)
    batch = preference_batch(lm.preprocessor, data, sequence_length=sequence_length)
    return [
        np.asarray(
            completion_log_probs(
                lm, batch[f"{side}_token_ids"], batch[f"{side}_padding_mask"],
                batch[f"{side}_completion_mask"],
            )[1]
        )
        for side in ("chosen", "rejected")
    ]  # fmt: skip


def accuracy_by_task(tasks, chosen, rejected):
    right = np.asarray(chosen) > np.asarray(rejected)
    cells = {t: right[np.asarray(tasks) == t] for t in dict.fromkeys(tasks)}
    cells["all"] = right
    return {t: (float(r.mean()), len(r)) for t, r in cells.items()}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=pathlib.Path, required=True)
    parser.add_argument("--reward-model", help="a GemmaRewardModel preset directory")
    parser.add_argument("--policy", help="a GemmaCausalLM preset (e.g. the SFT model)")
    parser.add_argument("--sequence-length", type=int, default=64)
    args = parser.parse_args()
    if not (args.reward_model or args.policy):
        parser.error("give --reward-model, --policy or both")
    with open(args.pairs, encoding="utf-8") as file:
        tasks = [json.loads(line).get("task", "all") for line in file if line.strip()]
    data = read_preference_data(args.pairs)
    rankers = [("reward model", reward_model_scores, args.reward_model),
               ("policy log-likelihood", policy_scores, args.policy)]  # fmt: skip
    for name, scores, preset in rankers:
        if preset:
            cells = accuracy_by_task(tasks, *scores(preset, data, args.sequence_length))
            print(f"{name:22}", " ".join(f"{t}={a:.1%}/{n}" for t, (a, n) in cells.items()))


if __name__ == "__main__":
    main()

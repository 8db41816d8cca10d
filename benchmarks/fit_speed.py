"""Training speed: keras_gemma's `fit` step beside keras-hub's, same weights,
same run, interleaved, on one backend per process.

    python benchmarks/fit_speed.py                      # all three backends
    python benchmarks/fit_speed.py --backend torch --rounds 5
    python benchmarks/fit_speed.py --backend torch --mode full --jit-compile

Config (from the project's issues): vocabulary 32000, 6 layers, 8 query heads,
1 key/value head, hidden 512, intermediate 4096, head dim 64, float32; batch
4 x 128 tokens. Modes: LoRA rank 4 on query/value, and full fine-tuning.
Both models train with Adam (1e-4) on the same random tokens through
`train_on_batch`, each with its default loss (ours: the chunked token-mean
cross-entropy; keras-hub's: sparse cross-entropy over the full logits).
Each round times `--steps` steps of each model, after a warm-up step
(compilation) each, alternating which goes first; tokens/s is the median over
rounds and the ratio is the median of the rounds' ratios, so load that drifts
between rounds (a shared host) cancels out of it.

The floor is timed beside them, written twice (3-D einsums as `EinsumDense`
writes them, and 2-D matmuls; each round keeps the faster): the same step's
matrix products (embedding lookup, attention and feed-forward projections,
the attention's two batched products, the tied output projection, the LoRA
adapters in LoRA mode), the same cross-entropy, accuracy and Adam through the
same `train_on_batch`, and nothing else (no norms, rotary, attention softmax,
GELU). A Gemma on the backend's own float32 kernels cannot do much better
than that, so keras-hub's time over the floor's bounds the ratio any such
implementation could reach against keras-hub (the "ceiling" column).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _machine import describe_cpu

CONFIG = dict(
    vocabulary_size=32000,
    num_layers=6,
    num_query_heads=8,
    num_key_value_heads=1,
    hidden_dim=512,
    intermediate_dim=4096,
    head_dim=64,
)
BATCH, LENGTH = 4, 128


def _floor_model(keras, lora, einsum):
    """The step's products, loss and optimizer alone (see the module docstring):
    as 3-D einsums (as `EinsumDense` writes them) or as 2-D matmuls, whichever
    the backend runs faster."""
    ops = keras.ops
    c = CONFIG
    dim, heads, head_dim = c["hidden_dim"], c["num_query_heads"], c["head_dim"]
    kv_dim, ffw = c["num_key_value_heads"] * head_dim, c["intermediate_dim"] // 2

    class Floor(keras.Model):
        def __init__(self):
            super().__init__()
            new = keras.initializers.RandomNormal(stddev=0.02)

            def weight(*shape, trainable=not lora):
                return self.add_weight(shape=shape, initializer=new, trainable=trainable)

            self.table = weight(c["vocabulary_size"], dim)
            self.blocks = []
            for _ in range(c["num_layers"]):
                block = dict(
                    q=weight(dim, heads * head_dim), k=weight(dim, kv_dim), v=weight(dim, kv_dim),
                    o=weight(heads * head_dim, dim), gate_up=weight(dim, 2 * ffw),
                    down=weight(ffw, dim),
                )  # fmt: skip
                if lora:  # rank 4 on query and value, trainable
                    for name, shape in dict(
                        qa=(dim, 4), qb=(4, heads * head_dim), va=(dim, 4), vb=(4, kv_dim)
                    ).items():
                        block[name] = weight(*shape, trainable=True)
                self.blocks.append(block)

        def call(self, inputs):
            def project(x, kernel):
                if einsum:
                    return ops.einsum("btd,df->btf", x, kernel)
                rows = ops.reshape(x, (-1, x.shape[-1]))
                return ops.reshape(ops.matmul(rows, kernel), (*x.shape[:-1], -1))

            batch, length = inputs["token_ids"].shape
            x = ops.take(self.table, inputs["token_ids"], axis=0)
            for b in self.blocks:
                q, k, v = project(x, b["q"]), project(x, b["k"]), project(x, b["v"])
                if lora:
                    q = q + project(project(x, b["qa"]), b["qb"])
                    v = v + project(project(x, b["va"]), b["vb"])
                q = ops.reshape(q, (batch, length, heads, head_dim))
                scores = ops.einsum("bshd,btd->bhst", q, k)
                attended = ops.einsum("bhst,btd->bshd", scores, v)
                x = x + project(ops.reshape(attended, (batch, length, -1)), b["o"])
                gate_up = project(x, b["gate_up"])
                x = x + project(gate_up[..., :ffw] * gate_up[..., ffw:], b["down"])
            if einsum:
                return ops.einsum("btd,vd->btv", x, self.table)
            return project(x, ops.transpose(self.table))

    model = Floor()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return model


def _child(mode, rounds, steps, jit_compile):
    import keras
    import keras_hub
    import numpy as np

    from keras_gemma import GemmaBackbone
    from keras_gemma import GemmaCausalLM
    from keras_gemma.weight_names import assign_to_keras_hub

    keras.utils.set_random_seed(0)
    ours = GemmaBackbone(**CONFIG)
    hub = keras_hub.models.GemmaBackbone(**CONFIG)
    assign_to_keras_hub(ours, hub)
    models = {"ours": GemmaCausalLM(ours), "keras_hub": keras_hub.models.GemmaCausalLM(hub)}
    for lm in models.values():
        if mode == "lora":
            lm.backbone.enable_lora(rank=4)
        lm.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit_compile or "auto")
    for einsum in (False, True):
        models[f"floor_{'einsum' if einsum else 'matmul'}"] = _floor_model(
            keras, lora=mode == "lora", einsum=einsum
        )
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(3, 32000, (BATCH, LENGTH)).astype("int32"),
        "padding_mask": np.ones((BATCH, LENGTH), "int32"),
    }
    y = rng.integers(3, 32000, (BATCH, LENGTH)).astype("int32")
    weights = np.ones((BATCH, LENGTH), "float32")
    first_step = {}
    for name, lm in models.items():
        start = time.perf_counter()
        lm.train_on_batch(x, y, sample_weight=weights)  # compile
        first_step[name] = time.perf_counter() - start
    times = {name: [] for name in models}
    for round_index in range(rounds):
        order = list(models) if round_index % 2 == 0 else list(models)[::-1]
        for name in order:
            start = time.perf_counter()
            for _ in range(steps):
                models[name].train_on_batch(x, y, sample_weight=weights)
            times[name].append((time.perf_counter() - start) / steps)
    result = {name: BATCH * LENGTH / statistics.median(t) for name, t in times.items()}
    ratios = [hub / ours for ours, hub in zip(times["ours"], times["keras_hub"])]
    result["ratio"] = statistics.median(ratios)
    result["ratio_range"] = [min(ratios), max(ratios)]
    floor = [min(pair) for pair in zip(times.pop("floor_matmul"), times.pop("floor_einsum"))]
    result["floor"] = BATCH * LENGTH / statistics.median(floor)
    result["ceiling"] = statistics.median(hub / f for f, hub in zip(floor, times["keras_hub"]))
    result["jit_compile"] = {name: bool(lm.jit_compile) for name, lm in models.items()}
    result["first_step_s"] = first_step
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["jax", "torch", "tensorflow"], action="append")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=["lora", "full"], action="append")
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile both models' train step (on torch: torch.compile; the first step "
        "then takes minutes)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("@@" + json.dumps(_child(args.child, args.rounds, args.steps, args.jit_compile)))
        return
    print(describe_cpu())
    print(f"load average at start: {os.getloadavg()}")
    header = f"{'backend':<11} {'mode':<5} {'ours tok/s':>11} {'keras-hub':>10} {'ratio':>6}"
    header += f" {'floor':>6} {'ceiling':>7}"
    print(
        f"{header}  (ratio: median of {args.rounds} rounds, their range; "
        "compiled; first step ours/keras-hub)"
    )
    for backend in args.backend or ["jax", "torch", "tensorflow"]:
        for mode in args.mode or ["lora", "full"]:
            env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
            command = [sys.executable, __file__, "--child", mode]
            command += ["--rounds", str(args.rounds), "--steps", str(args.steps)]
            command += ["--jit-compile"] if args.jit_compile else []
            output = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in output.stdout.splitlines() if line.startswith("@@")]
            if not lines:
                print(f"{backend:<11} {mode:<5} failed:\n{output.stderr[-2000:]}")
                continue
            result = json.loads(lines[-1][2:])
            ours, hub, (low, high) = result["ours"], result["keras_hub"], result["ratio_range"]
            first = result["first_step_s"]
            jit = "/".join(
                "yes" if result["jit_compile"][k] else "no" for k in ("ours", "keras_hub")
            )
            print(
                f"{backend:<11} {mode:<5} {ours:>11.0f} {hub:>10.0f} {result['ratio']:>6.2f}"
                f" {result['floor']:>6.0f} {result['ceiling']:>7.2f}"
                f"  ({low:.2f}-{high:.2f}; {jit}; first step "
                f"{first['ours']:.0f}/{first['keras_hub']:.0f} s)",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

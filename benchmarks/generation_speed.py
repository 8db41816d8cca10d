"""Small-config generation speed: keras_gemma beside keras-hub, same weights,
same run, every backend.

    python benchmarks/generation_speed.py            # all three backends
    python benchmarks/generation_speed.py --backend torch --runs 5

Config (from the project's issues): vocabulary 32000, 6 layers, 8 query heads,
1 key/value head, hidden 512, intermediate 4096, head dim 64, float32.
Greedy, batch 1, a 32-token prompt, 32 new tokens; tokens/s counts new tokens
over the whole call (prefill included), median of `--runs` after a warm-up
call whose time (compilation included) is reported as "first call". With
every backend, each runs in its own process, and the timed calls go round
the backends in turns (see `_Session`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _machine import describe_cpu
from fit_speed import CONFIG  # the issues' small config, defined once

PROMPT_LENGTH, NEW_TOKENS = 32, 32
PREFILL_LENGTH = 512


_TAG = "@@"
_PAUSE_S = 0.5  # marks the protocol's lines among whatever else a child prints


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


class _Session:
    """One backend's two models and inputs, timing one call per request:
    the parent interleaves requests across backends so that the host's
    drifting memory bandwidth (±15% between minutes here) falls on every
    backend alike instead of on whichever ran in a slow minute."""

    def __init__(self, batch_size):
        import keras
        import numpy as np

        from keras_gemma import GemmaBackbone
        from keras_gemma import GemmaCausalLM
        from keras_gemma.weight_names import assign_to_keras_hub

        keras.utils.set_random_seed(0)
        backbone = GemmaBackbone(**CONFIG)
        self.models = {"ours": GemmaCausalLM(backbone)}
        try:
            import keras_hub
        except ImportError:
            keras_hub = None
        if keras_hub is not None:
            reference = keras_hub.models.GemmaBackbone(**CONFIG)
            assign_to_keras_hub(backbone, reference)
            self.models["keras_hub"] = keras_hub.models.GemmaCausalLM(reference)
        length = PROMPT_LENGTH + NEW_TOKENS
        token_ids = np.zeros((batch_size, length), "int32")
        token_ids[:, :PROMPT_LENGTH] = np.random.default_rng(0).integers(3, 32000, PROMPT_LENGTH)
        mask = (np.arange(length) < PROMPT_LENGTH)[None].repeat(batch_size, 0)
        self.inputs = {"token_ids": token_ids, "padding_mask": mask.astype("int32")}
        # A 512-token prompt's prefill (plus one decoded token), batch 1.
        prompt = np.zeros((1, PREFILL_LENGTH + 1), "int32")
        prompt[0, :PREFILL_LENGTH] = np.random.default_rng(1).integers(3, 32000, PREFILL_LENGTH)
        self.prompt = {"token_ids": prompt, "padding_mask": (prompt > 0).astype("int32")}
        self.results = {"backend": keras.config.backend(), "batch_size": batch_size}
        for name, lm in self.models.items():
            lm.compile(sampler="greedy")
            self.results[f"{name}_first_s"] = _seconds(lambda name=name: self.generate(name))
            self.prefill(name)  # its shapes compile here, not in the first timed call
        if "keras_hub" in self.models:
            ours, theirs = (keras.ops.convert_to_numpy(self.generate(n)) for n in self.models)
            self.results["same_tokens"] = bool((ours == theirs).all())

    def generate(self, name):
        return self.models[name].generate(self.inputs, stop_token_ids=None)["token_ids"]

    def prefill(self, name):
        self.models[name].generate(self.prompt, stop_token_ids=None)

    def time(self, request):
        """Seconds of one `"generate ours"`, `"prefill keras_hub"`, ..."""
        kind, name = request.split()
        return _seconds(lambda: getattr(self, kind)(name))


def _summarize(results, times, batch_size):
    """Medians of the timed calls, as tokens/s."""
    for request, seconds in times.items():
        kind, name = request.split()
        median = statistics.median(seconds)
        if kind == "generate":
            results[f"{name}_tokens_per_s"] = NEW_TOKENS * batch_size / median
        else:
            results[f"{name}_prefill_tokens_per_s"] = PREFILL_LENGTH / median
    return results


def _requests(names):
    return [f"{kind} {name}" for kind in ("generate", "prefill") for name in names]


def _serve(batch_size):
    """A child's loop: timing requests on stdin, answers on stdout."""
    session = _Session(batch_size)
    print(_TAG + json.dumps({"results": session.results, "names": list(session.models)}))
    for line in sys.stdin:
        print(_TAG + json.dumps(session.time(line.strip())), flush=True)


class _Child:
    def __init__(self, backend, batch_size):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, __file__, "--serve", "--batch-size", str(batch_size)]
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        ready = self._answer()
        self.results, self.names = ready["results"], ready["names"]

    def _answer(self):
        for line in self.process.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG) :])
        raise RuntimeError(f"the benchmark's child exited ({self.process.wait()}); see above")

    def time(self, request):
        # Another backend's threads spin on idle for a while after its calls
        # (XLA's and oneDNN's pools): started at once, the next backend's
        # call shared the cores with them and PyTorch's decoding measured
        # ~25% slower than alone. A pause lets them sleep first.
        time.sleep(_PAUSE_S)
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["jax", "torch", "tensorflow"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return _serve(args.batch_size)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend  # before anything imports Keras
        session = _Session(args.batch_size)
        times = {r: [session.time(r) for _ in range(args.runs)] for r in _requests(session.models)}
        print(json.dumps(_summarize(session.results, times, args.batch_size)))
        return
    # One child per backend, set up one after another (first calls alone),
    # then every timed call in rounds across them.
    children = [_Child(backend, args.batch_size) for backend in ("jax", "torch", "tensorflow")]
    times = [{r: [] for r in _requests(child.names)} for child in children]
    for _ in range(args.runs):
        for child, child_times in zip(children, times):
            for request, seconds in child_times.items():
                seconds.append(child.time(request))
    for child in children:
        child.close()
    rows = [_summarize(c.results, t, args.batch_size) for c, t in zip(children, times)]
    best_reference = max(r.get("keras_hub_tokens_per_s", 0) for r in rows)
    print(
        f"batch {args.batch_size}, prompt {PROMPT_LENGTH}, {NEW_TOKENS} new tokens, float32, greedy"
    )
    print(f"(prefill: tokens/s of a {PREFILL_LENGTH}-token prompt, batch 1)")
    print(f"(medians of {args.runs} rounds, each timing every backend's calls in turn)")
    print(describe_cpu())
    print(
        f"{'backend':<11}{'ours tok/s':>11}{'keras-hub':>11}{'ratio':>8}{'vs best kh':>11}"
        f"{'first call (ours/kh)':>23}  same tokens  prefill ours/kh"
    )
    for r in rows:
        kh = r.get("keras_hub_tokens_per_s", float("nan"))
        print(
            f"{r['backend']:<11}{r['ours_tokens_per_s']:>11.1f}{kh:>11.1f}"
            f"{r['ours_tokens_per_s'] / kh:>8.2f}{r['ours_tokens_per_s'] / best_reference:>11.2f}"
            f"{r['ours_first_s']:>12.1f}s /{r.get('keras_hub_first_s', float('nan')):>6.1f}s"
            f"  {str(r.get('same_tokens')):<11}"
            f"  {r['ours_prefill_tokens_per_s']:.0f}/"
            f"{r.get('keras_hub_prefill_tokens_per_s', 0):.0f}"
        )


if __name__ == "__main__":
    main()

"""Multi-host model parallelism: two JAX processes on localhost (issue 4).

The test launches this file twice as a script, as processes 0 and 1 of a JAX
cluster on 127.0.0.1, each with 2 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`), so 4 global devices.
Each process joins with `keras.distribution.initialize(job_addresses=...,
num_processes=2, process_id=i)` (cross-process CPU collectives go through
gloo, JAX's default `jax_cpu_collectives_implementation`), builds the same
tiny multi-query backbone under `keras.distribution.ModelParallel` with
`GemmaBackbone.get_layout_map` on a mesh spanning both processes, and checks
against an unsharded copy computed locally in the same process:

- the sharded weights' specs, and that each process holds only its shards;
- the causal LM forward pass (allclose 1e-5), on a (1, 4) mesh (the model
  axis crosses processes) and a (2, 2) mesh (the batch axis crosses them);
- one LoRA `fit` (2 epochs) on the (2, 2) mesh: the same losses and trained
  weights as unsharded, on both processes. In multi-process JAX, Keras takes
  the arrays given to `fit` as each process's local share of the global batch
  (and refuses non-`tf.data` input unless `distribution.auto_shard_dataset =
  False`): each process feeds its 4 of the 8 rows.

Run by hand (two shells, or `&`):

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/test_multihost.py --worker 0 12345
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/test_multihost.py --worker 1 12345
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

TIMEOUT_S = 120
HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The worker: run as `python tests/test_multihost.py --worker PROCESS_ID PORT`.


def _worker(process_id, port):
    started = time.perf_counter()
    import jax
    import keras
    import numpy as np
    from conftest import make_backbone
    from jax.experimental import multihost_utils

    from keras_gemma import GemmaBackbone
    from keras_gemma import GemmaCausalLM

    assert keras.config.backend() == "jax", keras.config.backend()
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    assert jax.process_count() == 2 and jax.process_index() == process_id
    assert jax.local_device_count() == 2 and jax.device_count() == 4, jax.devices()
    timings = {"initialize_s": time.perf_counter() - started}

    def gather(x):
        """The global value of a (possibly non-addressable) array or variable."""
        x = x.value if isinstance(x, keras.Variable) else x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    tokens = np.array(
        [[2, 17, 99, 5, 250, 31, 7, 42]] * 4 + [[2, 64, 3, 12, 9, 0, 0, 0]] * 4, "int32"
    )
    mask = (tokens > 0).astype("int32")
    inputs = {"token_ids": tokens, "padding_mask": mask}

    def sharded_copy(reference, distribution):
        with distribution.scope():
            backbone = make_backbone("mqa")
        copy_weights(reference, backbone)
        return backbone

    def copy_weights(source, target):
        values = {v.path: np.asarray(v.value) for v in source.weights}
        for variable in target.weights:
            variable.assign(values[variable.path])

    def model_parallel(reference, mesh_shape):
        mesh = keras.distribution.DeviceMesh(
            mesh_shape, ("batch", "model"), devices=keras.distribution.list_devices()
        )
        layout_map = GemmaBackbone.get_layout_map(mesh, config=reference.config)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        return distribution, layout_map

    # The unsharded reference lives on this process's first device only.
    reference = make_backbone("mqa")
    reference_values = {v.path: np.asarray(v.value) for v in reference.weights}
    expected = np.asarray(GemmaCausalLM(reference)(inputs))
    result = {"process_id": process_id, "max_abs_diff": {}}
    for mesh_shape in ((1, 4), (2, 2)):
        tic = time.perf_counter()
        distribution, layout_map = model_parallel(reference, mesh_shape)
        backbone = sharded_copy(reference, distribution)
        sharded_paths = []
        for variable in backbone.weights:
            value = variable.value
            spec = tuple(value.sharding.spec) + (None,) * (
                len(variable.shape) - len(value.sharding.spec)
            )
            assert spec == layout_map[variable.path].axes, (variable.path, spec)
            assert len(value.sharding.device_set) == 4, variable.path
            if "model" in spec:
                sharded_paths.append(variable.path)
                assert not value.is_fully_addressable, variable.path
                # This process's 2 devices hold 1/model_size of it each.
                shards = value.addressable_shards
                assert len(shards) == 2, variable.path
                assert all(s.data.size * mesh_shape[1] == value.size for s in shards), variable.path
            np.testing.assert_array_equal(gather(value), reference_values[variable.path])
        assert any("key" in p for p in sharded_paths), sharded_paths  # MQA: along hidden
        with distribution.scope():
            logits = GemmaCausalLM(backbone)(inputs)
        got = gather(logits)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        result["max_abs_diff"][str(mesh_shape)] = float(np.max(np.abs(got - expected)))
        timings[f"forward_{mesh_shape[0]}x{mesh_shape[1]}_s"] = time.perf_counter() - tic

    # One LoRA fit (2 epochs) on the (2, 2) mesh against the same fit unsharded.
    tic = time.perf_counter()
    y = np.zeros_like(tokens)
    y[:, :-1] = tokens[:, 1:]
    sample_weight = mask.astype("float32")

    def fit(lm, rows=slice(None)):
        lm.compile(optimizer=keras.optimizers.Adam(1e-2))
        x = {k: v[rows] for k, v in inputs.items()}
        history = lm.fit(
            x,
            y[rows],
            sample_weight=sample_weight[rows],
            batch_size=len(y[rows]),
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        return history.history["loss"]

    distribution, _ = model_parallel(reference, (2, 2))
    # Keras refuses non-tf.data input in multi-worker runs unless told that it
    # is already sharded: each process feeds its half of the global batch
    # (the batch axis's row of devices is this process's), so the global
    # batch is exactly the 8 rows the unsharded fit sees.
    distribution.auto_shard_dataset = False
    local_rows = slice(4 * process_id, 4 * process_id + 4)
    backbone = sharded_copy(reference, distribution)
    reference.enable_lora(2, target_layer_names=["query", "value", "ffw_linear"])
    with distribution.scope():
        backbone.enable_lora(2, target_layer_names=["query", "value", "ffw_linear"])
    copy_weights(reference, backbone)  # the same LoRA initialisation
    expected_losses = fit(GemmaCausalLM(reference))
    with distribution.scope():
        losses = fit(GemmaCausalLM(backbone), local_rows)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0], losses
    # Training kept the layout, and both copies of the trained weights agree.
    for variable in backbone.weights:
        if "lora" not in variable.path and "model" in layout_map[variable.path].axes:
            assert len(variable.value.sharding.device_set) == 4, variable.path
    trained = {v.path: gather(v) for v in backbone.weights}
    for variable in reference.weights:
        np.testing.assert_allclose(trained[variable.path], np.asarray(variable.value), atol=1e-4)
    result["losses"] = [float(v) for v in losses]
    result["expected_losses"] = [float(v) for v in expected_losses]
    timings["lora_fit_s"] = time.perf_counter() - tic
    # Every process agrees on the losses (a cross-process check of its own).
    all_losses = multihost_utils.process_allgather(np.asarray(losses, "float32"))
    np.testing.assert_array_equal(all_losses[0], all_losses[1])
    timings["total_s"] = time.perf_counter() - started
    result["timings"] = timings
    print("RESULT " + json.dumps(result), flush=True)
    multihost_utils.sync_global_devices("done")


# The test.


def _launch(tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(HERE), HERE, env.get("PYTHONPATH")) if p
    )
    procs, logs = [], []
    try:
        for process_id in range(2):
            log = open(tmp_path / f"worker{process_id}.log", "w+")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(process_id), str(port)],
                    cwd=os.path.dirname(HERE),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return procs, outputs, timed_out


@pytest.mark.slow(reason="two JAX processes, each compiling sharded forwards and a train step")
def test_model_parallel_across_two_processes(tmp_path):
    import keras

    if keras.config.backend() != "jax":
        pytest.skip(
            "multi-process sharding through keras.distribution.initialize is JAX-only "
            f"(backend is {keras.config.backend()!r})"
        )
    procs, outputs, timed_out = _launch(tmp_path)
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{out[-4000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs))
    )
    assert not timed_out, f"workers did not finish within {TIMEOUT_S} s\n{report}"
    for proc in procs:
        assert proc.returncode == 0, report
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, report
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    assert [r["process_id"] for r in results] == [0, 1]
    assert results[0]["losses"] == results[1]["losses"]
    print(json.dumps(results, indent=1))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), int(sys.argv[3]))

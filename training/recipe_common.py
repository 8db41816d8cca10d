"""What the training recipes share: backend choice, seeding, a deterministic
batch order, resume after a kill, logs and curves, and distribution.

Not a script. The recipes import it as a sibling module (`python
training/sft.py` puts `training/` on the path), and it must be imported
before Keras so that `--backend` can still choose the backend.

Resuming. Keras 3.15's `BackupAndRestore` does not fit: it restores the
epoch number but not the position inside an epoch (a run killed mid-epoch
restarts that epoch from its first batch), and it saves through
`save_weights`, where an `EinsumDense` with LoRA stores its merged kernel and
reloads with zeroed adapters, so LoRA runs could not resume at all.
`EpochBackup` saves the trainable variables and the optimizer's state at
every epoch end (atomically, to one `.npz`), and `fit_resumable` restores
them and passes the epoch to `fit(initial_epoch=...)`. The recipes use short
"epochs" of `--steps-per-epoch` steps and draw batch `i` of epoch `e` as a
pure function of `(seed, e, i)` (`StepBatches`), so a rerun after a kill
replays exactly the steps an uninterrupted run takes after the last backup
and ends with the same weights.
"""

import csv
import json
import os
import pathlib
import shutil
import sys
import time

BACKENDS = ("jax", "torch", "tensorflow")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def set_backend_from_argv(argv=None):
    """Sets KERAS_BACKEND from `--backend NAME` before Keras is imported.

    Without the flag the environment's KERAS_BACKEND (or Keras's default)
    stays. Also puts the repository on `sys.path`, so a plain checkout runs.
    """
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        value = None
        if arg == "--backend" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--backend="):
            value = arg.split("=", 1)[1]
        if value is not None:
            if value not in BACKENDS:
                raise SystemExit(f"--backend must be one of {BACKENDS}; received {value!r}")
            if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != value:
                raise SystemExit(
                    f"--backend {value}: Keras is already imported with another backend."
                )
            os.environ["KERAS_BACKEND"] = value
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


set_backend_from_argv()

import keras  # noqa: E402
import numpy as np  # noqa: E402


def add_common_arguments(parser, steps=1000, batch_size=32, learning_rate=1e-3):
    """The flags every training recipe takes."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend (default: $KERAS_BACKEND, else Keras's default)",
    )
    parser.add_argument("--output", type=pathlib.Path, required=True, help="run directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps in all")
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=50,
        help="steps between backups (a kill loses at most this many) and log rows",
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, help="global batch size")
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument(
        "--model-parallel",
        type=int,
        default=1,
        help="JAX only: split each weight over N devices (keras.distribution.ModelParallel "
        "with GemmaBackbone.get_layout_map); the remaining devices split the batch",
    )
    parser.add_argument("--verbose", type=int, default=1, help="Keras progress bar verbosity")
    return parser


def seed_everything(seed):
    """Seeds Python, NumPy and the backend, and asks for deterministic kernels."""
    keras.utils.set_random_seed(seed)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


# Distribution: ModelParallel on JAX, data parallel under torchrun.


class Cluster:
    """This process's place among the training processes.

    `rank` and `world_size` are those of `torchrun` (data parallel on
    PyTorch); one process otherwise, including JAX model parallelism, where
    one process drives every device.
    """

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size

    @property
    def is_chief(self):
        return self.rank == 0

    def callbacks(self):
        if self.world_size == 1:
            return []
        from keras_gemma import torch_distributed

        return [torch_distributed.DataParallel()]


def setup_distribution(model_parallel):
    """Sets up model or data parallelism before any model is built.

    Returns a `Cluster`. `model_parallel > 1` needs JAX and at least that
    many devices; under `torchrun` (WORLD_SIZE > 1) on PyTorch, each process
    joins the process group and trains on its share of each batch.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    backend = keras.config.backend()
    if model_parallel > 1:
        if backend != "jax":
            raise SystemExit(
                "--model-parallel needs --backend jax (keras.distribution); on PyTorch "
                "use torchrun for data parallelism."
            )
        from keras_gemma import GemmaBackbone

        devices = keras.distribution.list_devices()
        if len(devices) % model_parallel:
            raise SystemExit(
                f"--model-parallel {model_parallel} does not divide the {len(devices)} devices."
            )
        mesh = keras.distribution.DeviceMesh(
            (len(devices) // model_parallel, model_parallel), ("batch", "model"), devices
        )
        # keras.io's flow: the layout is set before the model is built, so
        # every weight is created already split.
        layout_map = GemmaBackbone.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
        )
        return Cluster()
    if world_size > 1:
        if backend != "torch":
            raise SystemExit("Under torchrun, use --backend torch.")
        from keras_gemma import torch_distributed

        rank, world_size = torch_distributed.initialize()
        return Cluster(rank, world_size)
    return Cluster()


# Data.


class StepBatches(keras.utils.PyDataset):
    """`steps_per_epoch` batches whose content depends only on the step.

    The examples are read as an endless stream of passes, each pass a
    permutation drawn from `seed + pass`; global step `g` takes stream
    positions `[g * batch_size, (g + 1) * batch_size)`. `epoch` is set by
    `EpochSetter` at each epoch start, so after a restore the same steps
    see the same batches. Under data parallelism each rank keeps its
    contiguous share of every global batch.

    Args:
        examples: a list of strings, a dict of equal-length lists (e.g.
            `{"prompts", "responses"}`), or a `keras_gemma.load_dataset`
            dataset of files (read by index).
        preprocessor: turns a batch of examples into `(x, y, sample_weight)`.
        batch_size: the global batch size.
        steps_per_epoch: batches per Keras epoch.
        seed: the order's seed.
        rank, world_size: this process's share of each batch.
    """

    def __init__(
        self, examples, preprocessor, batch_size, steps_per_epoch, seed=0, rank=0, world_size=1
    ):
        super().__init__()
        if batch_size % world_size:
            raise ValueError(
                f"The batch size {batch_size} must divide by the {world_size} processes."
            )
        self.examples = examples
        self.size = (
            len(next(iter(examples.values()))) if isinstance(examples, dict) else len(examples)
        )
        if self.size == 0:
            raise ValueError("No training examples.")
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._orders = {}

    def __len__(self):
        return self.steps_per_epoch

    def _order(self, data_pass):
        if data_pass not in self._orders:
            self._orders = {
                data_pass: np.random.default_rng(self.seed + data_pass).permutation(self.size)
            }
        return self._orders[data_pass]

    def indices(self, step):
        """The example indices of global step `step`, this rank's share."""
        share = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * share
        positions = np.arange(start, start + share)
        return np.array([self._order(p // self.size)[p % self.size] for p in positions])

    def __getitem__(self, index):
        return self.preprocessor(self.read(self.indices(self.epoch * self.steps_per_epoch + index)))

    def read(self, indices):
        """The raw examples at `indices`, as one batch."""
        if hasattr(self.examples, "read"):
            return self.examples.read([int(i) for i in indices])
        if isinstance(self.examples, dict):
            return {k: [v[i] for i in indices] for k, v in self.examples.items()}
        return [self.examples[i] for i in indices]


class EpochSetter(keras.callbacks.Callback):
    """Tells a `StepBatches` which epoch is starting (also after a restore)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


# Optimizer.


def make_optimizer(learning_rate, total_steps, warmup_steps, weight_decay):
    """AdamW with linear warmup then cosine decay to 10%, clipped gradients.

    The schedule reads the optimizer's step counter, which the backup
    restores, so a resumed run continues on the same curve.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=0.1,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=weight_decay, global_clipnorm=1.0
    )
    # RMSNorm scales (stored as 0 for "multiply by 1") are not decayed.
    optimizer.exclude_from_weight_decay(var_names=["scale"])
    return optimizer


# Training with backups, logs and curves.


class StepTimer(keras.callbacks.Callback):
    """Adds `seconds` (wall time of the epoch) to the logs the CSV records."""

    def on_epoch_begin(self, epoch, logs=None):
        import time

        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        import time

        if logs is not None:
            logs["seconds"] = round(time.perf_counter() - self._start, 3)


class EpochBackup(keras.callbacks.Callback):
    """Saves what training changes at each epoch end, for `restore_backup`.

    Trainable variables (frozen base weights are reloaded from their preset,
    so a LoRA backup holds only the adapters) and the optimizer's variables,
    step counter included, go to `directory/backup.npz` with the number of
    epochs done; the file is replaced atomically, so a kill while writing
    leaves the previous backup intact.
    """

    def __init__(self, directory):
        super().__init__()
        self.path = pathlib.Path(directory) / "backup.npz"

    def on_epoch_end(self, epoch, logs=None):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"epochs_done": np.asarray(epoch + 1)}
        for prefix, variables in _backed_up_variables(self.model):
            for i, variable in enumerate(variables):
                arrays[f"{prefix}_{i}"] = keras.ops.convert_to_numpy(variable.value)
        temporary = self.path.with_name("backup.tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, self.path)


def _backed_up_variables(model):
    return (("model", model.trainable_variables), ("optimizer", model.optimizer.variables))


def restore_backup(model, directory):
    """Loads an `EpochBackup` into `model`; returns the epochs already done (0 if none)."""
    path = pathlib.Path(directory) / "backup.npz"
    if not path.exists():
        return 0
    with np.load(path) as arrays:
        for prefix, variables in _backed_up_variables(model):
            for i, variable in enumerate(variables):
                value = arrays[f"{prefix}_{i}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise SystemExit(
                        f"{path} does not match this model ({variable.path}: "
                        f"{value.shape} vs {variable.shape}); delete it or use the same flags."
                    )
                variable.assign(value)
        epochs_done = int(arrays["epochs_done"])
    print(f"resuming from {path} after epoch {epochs_done}")
    return epochs_done


def fit_resumable(
    lm, data, output, total_steps, steps_per_epoch, cluster, verbose=1, extra_callbacks=(), **fit
):
    """Runs `lm.fit(data, ...)` for `total_steps`, resuming from `output/backup`.

    `data` is a `StepBatches`, or anything whose batches are a function of
    the step (an RLHF trainer's prompts: its rollouts follow the optimizer's
    step count); `fit` holds further `fit` arguments. Writes
    `output/log.csv` (one row per epoch) and `output/curves.png`. A rerun
    after a kill restores the last epoch's backup and continues; the backup
    is kept until the caller has saved the result and calls `finish(output)`,
    so a kill in between cannot lose the run. Returns the `History`.
    """
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    epochs = total_steps // steps_per_epoch
    if epochs * steps_per_epoch != total_steps:
        raise SystemExit(
            f"--steps ({total_steps}) must be a multiple of --steps-per-epoch "
            f"({steps_per_epoch}), so every epoch ends on a backup."
        )
    backup = output / "backup" / f"rank{cluster.rank}"
    log = output / "log.csv"
    # The optimizer's variables must exist before a backup can fill them.
    lm.optimizer.build(lm.trainable_variables)
    initial_epoch = restore_backup(lm, backup)
    if initial_epoch == 0 and log.exists() and cluster.is_chief:
        log.unlink()  # A fresh start: the old log belongs to another run.
    callbacks = [*cluster.callbacks(), StepTimer(), EpochBackup(backup)]
    if isinstance(data, StepBatches):
        callbacks.insert(0, EpochSetter(data))
        fit = {"shuffle": False, **fit}
    else:
        fit = {"steps_per_epoch": steps_per_epoch, **fit}
    if cluster.is_chief:
        # After the backup, so a logged epoch is always a restorable one.
        callbacks.append(keras.callbacks.CSVLogger(str(log), append=True))
    callbacks.extend(extra_callbacks)
    history = lm.fit(
        data,
        epochs=epochs,
        initial_epoch=initial_epoch,
        verbose=verbose,
        callbacks=callbacks,
        **fit,
    )
    if cluster.is_chief:
        plot_curves(log, output / "curves.png")
    return history


def train(model, data, preprocess, args, cluster, callbacks, what):
    """Compiles `model` with the recipes' optimizer and trains it resumably on
    `data` in step-addressed batches (`StepBatches`)."""
    model.compile(
        optimizer=make_optimizer(
            args.learning_rate, args.steps, args.warmup_steps, args.weight_decay
        )
    )
    batches = StepBatches(
        data,
        preprocess,
        args.batch_size,
        args.steps_per_epoch,
        args.seed,
        cluster.rank,
        cluster.world_size,
    )
    start = time.perf_counter()
    fit_resumable(
        model, batches, args.output, args.steps, args.steps_per_epoch, cluster, args.verbose,
        callbacks,
    )  # fmt: skip
    print(f"{what} took {time.perf_counter() - start:.0f}s (this run)")


def save_result(model, args, cluster, preset):
    """On the chief: saves the LoRA adapters (if any), merges them so the
    preset serves without them, writes the preset and drops the backups."""
    if not cluster.is_chief:
        return
    if getattr(args, "lora_rank", None):
        model.backbone.save_lora_weights(str(args.output / "adapter.lora.safetensors"))
        model.backbone.merge_lora()
    model.save_to_preset(preset)
    finish(args.output)
    print(f"saved {preset}")


def trainable_count(model):
    """How many weights `fit` updates."""
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def evaluate_held_out(model, data, args, cluster):
    """Evaluates `model` on held-out `data`, prints the metrics and, on the
    chief, writes them atomically to `validation.json` in `--output`."""
    metrics = model.evaluate(data, batch_size=args.batch_size, verbose=0, return_dict=True)
    print("held-out: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if cluster.is_chief:
        path = args.output / "validation.json"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(temporary, path)
    return metrics


def finish(output):
    """Deletes the backups once the result is saved: the next run starts over."""
    shutil.rmtree(pathlib.Path(output) / "backup", ignore_errors=True)


def plot_curves(csv_path, png_path, title=None):
    """Plots every numeric column of a CSV log against its first column.

    matplotlib is optional: without it, one line says so and nothing is drawn.
    """
    plt = pyplot(png_path, f" (the numbers are in {csv_path})")
    if plt is None:
        return None
    with open(csv_path) as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return None
    x_key = next(iter(rows[0]))
    # CSVLogger writes "NA" for validation columns a run does not have.
    columns = [
        k
        for k in rows[0]
        if k != x_key and "seconds" not in k and all(r[k] not in ("", "NA") for r in rows)
    ]
    figure, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3), squeeze=False)
    x = [float(r[x_key]) + 1 for r in rows]
    for axis, key in zip(axes[0], columns):
        axis.plot(x, [float(r[key]) for r in rows], marker=".")
        axis.set_xlabel(x_key)
        axis.set_title(key)
    if title:
        figure.suptitle(title)
    return save_figure(plt, figure, png_path)


def pyplot(png_path, where_numbers_are=""):
    """`matplotlib.pyplot` with a file backend, or None (after a one-line
    note) where matplotlib, an optional extra, is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; no {png_path}{where_numbers_are}.")
        return None
    return plt


def save_figure(plt, figure, png_path):
    figure.tight_layout()
    figure.savefig(png_path, dpi=80)
    plt.close(figure)
    return png_path


def model_summary_line(lm):
    backbone = lm.backbone
    return (
        f"backend={keras.config.backend()} parameters={backbone.count_params():,} "
        f"layers={backbone.num_layers} hidden={backbone.hidden_dim}"
    )

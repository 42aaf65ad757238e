"""Training with the engine: global batch arithmetic, and `fit` with exact resume.

* `split_global_batch(...)` turns a global batch into the per-step batch fed
  to `fit` when the batch is reached with several replicas and gradient
  accumulation.
* `fit(...)` trains a compiled model with per-replica XLA
  (`noisy_keras.engine.steps`), crash-safe, exactly resumable checkpoints and
  a stop for diverged runs (`noisy_keras.engine.checkpointing`), the run's
  status written by its `noisy_keras.engine.rundir.RunDir`.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks".
    P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
    1 Hour", 2017 (global batch = per-replica batch x replicas; mean loss).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import keras
import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras._validation import check_positive_int, replica_share
from noisy_keras.data.epochs import epoch_stream
from noisy_keras.data.shards import ShardedEpochs
from noisy_keras.engine import checkpointing, distribute
from noisy_keras.engine import steps as replica_xla
from noisy_keras.engine.rundir import RunDir
from noisy_keras.models import zoo as models

__all__ = ["BatchSplit", "FitResult", "fit", "split_global_batch", "train_stream"]


@dataclasses.dataclass(frozen=True)
class BatchSplit:
    """How a global batch is reached: step batch x accumulation steps.

    Attributes:
        global_batch_size: examples per parameter update.
        num_replicas: replicas in sync (devices x workers).
        accumulation_steps: micro-batches accumulated per update (k).
        step_batch_size: the batch each `fit` step takes, over all replicas
            (global_batch_size / k): batch the dataset with this.
        per_replica_batch_size: what one device computes per step
            (step_batch_size / num_replicas).
    """

    global_batch_size: int
    num_replicas: int
    accumulation_steps: int
    step_batch_size: int
    per_replica_batch_size: int


def split_global_batch(
    global_batch_size: int, num_replicas: int = 1, accumulation_steps: int = 1
) -> BatchSplit:
    """Splits a global batch over replicas and accumulated micro-batches.

    Rule: global_batch_size = per_replica_batch_size x num_replicas x
    accumulation_steps. With `fit(..., accumulation_steps=k)` the engine
    averages k consecutive step gradients before one update, each of which is
    already the mean over the replicas' step batch, so the update is the mean
    gradient over the global batch; `NoisyOptimizer` adds its noise once per
    update.

    Args:
        global_batch_size: examples per parameter update.
        num_replicas: `strategy.num_replicas_in_sync`.
        accumulation_steps: micro-batches per update (1 for none).

    Returns:
        A `BatchSplit`.

    Raises:
        ValueError: a non-positive argument, or a global batch that is not a
            multiple of num_replicas x accumulation_steps (the message names
            the nearest allowed sizes).

    Example:
        >>> split_global_batch(4096, num_replicas=8, accumulation_steps=4)
        BatchSplit(global_batch_size=4096, num_replicas=8, accumulation_steps=4,
                   step_batch_size=1024, per_replica_batch_size=128)
    """
    check_positive_int("global_batch_size", global_batch_size)
    check_positive_int("num_replicas", num_replicas)
    check_positive_int("accumulation_steps", accumulation_steps)
    per_replica = replica_share(global_batch_size, num_replicas, accumulation_steps)
    if per_replica is None:
        unit = num_replicas * accumulation_steps
        lower = (global_batch_size // unit) * unit
        nearest = [n for n in (lower, lower + unit) if n > 0]
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by num_replicas x "
            f"accumulation_steps = {num_replicas} x {accumulation_steps} = {unit}; allowed: "
            f"multiples of {unit}, e.g. {' or '.join(map(str, nearest))}."
        )
    return BatchSplit(
        global_batch_size=global_batch_size,
        num_replicas=num_replicas,
        accumulation_steps=accumulation_steps,
        step_batch_size=per_replica * num_replicas,
        per_replica_batch_size=per_replica,
    )


def train_stream(train_data, strategy, first_epoch: int, epochs: int, steps_per_epoch: int):
    """What `fit` trains on: epochs `first_epoch..epochs-1` of `train_data`, for `model.fit`.

    Rule: a `noisy_keras.data.shards.ShardedEpochs` (e.g. `train_epochs` of a
    dataset) on several replicas becomes per-worker input,
    `strategy.distribute_datasets_from_function`: each worker's pipeline reads
    only its replicas' slices of every global batch (`steps_per_epoch` x its
    local replicas per-replica batches per epoch). Anything else is one stream
    of global batches (`noisy_keras.data.epochs.epoch_stream`), which Keras splits
    over the replicas (and, with several workers, auto-shards).

    Returns:
        A `tf.data.Dataset` or a `tf.distribute.DistributedDataset`.
    """
    if isinstance(train_data, ShardedEpochs) and strategy.num_replicas_in_sync > 1:

        def pipeline(input_context):
            epochs_of_pipeline = train_data.for_pipeline(input_context)
            per_epoch = steps_per_epoch * epochs_of_pipeline.shard.local_replicas
            return epoch_stream(
                epochs_of_pipeline,
                first_epoch=first_epoch,
                epochs=epochs,
                batches_per_epoch=per_epoch,
            )

        return strategy.distribute_datasets_from_function(pipeline)
    return epoch_stream(
        train_data, first_epoch=first_epoch, epochs=epochs, batches_per_epoch=steps_per_epoch
    )


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        model: the trained model (built by `fit` when given a function).
        status: "done" or "diverged".
        history: Keras' `History.history` of this invocation (metric -> list).
        initial_epoch: the epoch training (re)started at (> 0 after a resume).
        epochs_completed: epochs completed when `fit` returned.
        message: why a run diverged ("" otherwise).
        diverged_at: {"step", "epoch", "batch"} of the first non-finite loss (indices
            from 0), or None.
        checkpoint: path of the latest checkpoint, or None.
    """

    model: keras.Model
    status: str
    history: dict
    initial_epoch: int
    epochs_completed: int
    message: str = ""
    diverged_at: dict | None = None
    checkpoint: str | None = None


def _build_model(model, strategy):
    if isinstance(model, keras.Model):
        if strategy is not None and model.distribute_strategy is not strategy:
            raise ValueError(
                "`model` was built under a different strategy than `strategy`; build it inside "
                "`strategy.scope()`, or pass a function that builds and compiles it."
            )
        return model, model.distribute_strategy
    if callable(model):
        strategy = strategy or tf.distribute.get_strategy()
        with strategy.scope():
            built = model()
        if not isinstance(built, keras.Model):
            raise ValueError(
                "`model` as a function must return a compiled keras.Model; it returned "
                f"{type(built).__name__}."
            )
        return built, strategy
    raise ValueError(
        "`model` must be a compiled keras.Model or a function returning one; received "
        f"{type(model).__name__}."
    )


def fit(
    model,
    train_data,
    *,
    epochs: int,
    steps_per_epoch: int,
    workdir: str | os.PathLike | RunDir | None = None,
    validation_data=None,
    validation_steps: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy=None,
    xla="auto",
    accumulation_steps: int = 1,
    checkpoint_every_epochs: int = 1,
    max_checkpoints: int = 2,
    verbose="auto",
) -> FitResult:
    """Trains `model` with per-replica XLA, exact resume and divergence stop.

    Rule: epochs `initial_epoch..epochs-1` are trained with `model.fit`, where
    `initial_epoch` is the number of epochs the latest checkpoint in
    `workdir/checkpoints` had completed (0 without one). After each epoch (or
    every `checkpoint_every_epochs`) model, optimizer (slots, iterations =
    noise step and learning-rate schedule position, accumulators) and epoch
    count are checkpointed; see `noisy_keras.engine.checkpointing`. A NaN/Inf loss
    stops the run at that step with status "diverged", and nothing is saved
    after it. `workdir/status.json` holds "running", "done" or "diverged".

    Exact resume needs the epoch-e batches to be a function of e: pass
    `train_data` as a function `epoch -> tf.data.Dataset` (e.g.
    `noisy_keras.data.epochs.epoch_batches(...)` or
    `noisy_keras.data.pipeline.ClassificationData.train_epochs`),
    or a deterministic `tf.data.Dataset`, which is repeated and fast-forwarded
    by `initial_epoch * steps_per_epoch` batches on resume. For bit-identical results also call
    `tf.config.experimental.enable_op_determinism()` and seed the model
    (`keras.utils.set_random_seed`) before building it.

    Args:
        model: a compiled `keras.Model` built inside `strategy.scope()`, or a
            function with no arguments that builds and compiles one (`fit`
            calls it inside the scope).
        train_data: batches of the step batch size (see
            `split_global_batch`), as a function of the epoch or a dataset.
        epochs: total epochs of the run (not "more epochs").
        steps_per_epoch: steps per epoch; must be a multiple of
            `accumulation_steps`, so that checkpoints fall between updates.
        workdir: directory (a path or a `RunDir`) for checkpoints and
            status; None trains without either (no resume).
        validation_data: as in `keras.Model.fit`.
        validation_steps: as in `keras.Model.fit`.
        callbacks: Keras callbacks, run as in `model.fit`. A
            `keras.callbacks.BackupAndRestore` resumes exactly too: its backup's
            epoch is where training and the data restart (after the `workdir`
            checkpoint, if both exist: Keras loads the backup's weights last).
            Its mid-epoch backups (`save_freq` a number of batches) are refused:
            Keras restarts such an epoch from its first batch with a later
            batch's weights.
        strategy: the strategy; defaults to the model's (or the current one
            when `model` is a function).
        xla: "auto" (see `noisy_keras.engine.distribute.resolve_xla`), True or
            False. Both use the same per-replica step semantics
            (`noisy_keras.engine.steps.enable_replica_xla`).
        accumulation_steps: micro-batches (steps) per parameter update, k;
            the engine averages their gradients (see `split_global_batch`).
        checkpoint_every_epochs: checkpoint period in epochs (the last epoch
            is always saved).
        max_checkpoints: newest checkpoints kept.
        verbose: as in `keras.Model.fit`.

    Returns:
        A `FitResult`.

    Raises:
        ValueError: bad arguments (each message names the argument).

    Example:
        >>> strategy = make_strategy("mirrored")
        >>> result = fit(build_and_compile, epoch_batches((x, y), batch_size=256, seed=0),
        ...              epochs=30, steps_per_epoch=len(x) // 256, workdir="runs/a",
        ...              strategy=strategy)
        >>> result.status
        'done'
    """
    check_positive_int("epochs", epochs)
    check_positive_int("steps_per_epoch", steps_per_epoch)
    check_positive_int("checkpoint_every_epochs", checkpoint_every_epochs)
    backups = [c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)]
    for backup in backups:
        if backup.save_freq != "epoch":
            raise ValueError(
                f"callbacks holds keras.callbacks.BackupAndRestore(save_freq={backup.save_freq!r}"
                "): Keras restarts a mid-epoch backup's epoch from its first batch with the "
                "weights of a later batch, so the run would not continue exactly. Allowed: "
                "save_freq='epoch', or the engine's own checkpoints (workdir=...)."
            )
    k = check_positive_int("accumulation_steps", accumulation_steps)
    if steps_per_epoch % k:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch} is not a multiple of accumulation_steps={k}; "
            f"allowed: multiples of {k}, so that every epoch ends on a parameter update."
        )
    model, strategy = _build_model(model, strategy)
    if not model.compiled:
        raise ValueError("`model` must be compiled (model.compile(optimizer=..., loss=...)).")
    use_xla = distribute.resolve_xla(xla, strategy)
    if use_xla and internals.is_op_determinism_enabled() and models.has_max_pooling(model):
        raise ValueError(
            "xla=True with TensorFlow's op determinism on "
            "(tf.config.experimental.enable_op_determinism()) for a model with max pooling: XLA "
            "has no deterministic max-pooling gradient, and the first step would fail. Allowed: "
            "xla=False, or op determinism off (the noise stays reproducible: it is a function "
            "of the seed and the update count)."
        )
    steps = replica_xla.replica_steps(model)
    if steps is None or steps.jit_compile != use_xla or steps.accumulation_steps != k:
        replica_xla.enable_replica_xla(model, jit_compile=use_xla, accumulation_steps=k)
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

    initial_epoch = 0
    checkpointer = None
    chief = distribute.is_chief(strategy)
    run_dir = None
    if workdir is not None:
        run_dir = workdir if isinstance(workdir, RunDir) else RunDir(workdir)
        checkpointer = checkpointing.Checkpointer(
            model,
            run_dir.checkpoint_dir,
            max_to_keep=max_checkpoints,
            strategy=strategy,
        )
        initial_epoch = checkpointer.restore_latest()
    for backup in backups:  # Keras' fit will start at the backup's epoch: so must the data
        restored = internals.backup_and_restore_epoch(backup)
        if restored is not None:
            initial_epoch = restored
    guard = checkpointing.DivergenceGuard(steps_per_epoch)
    run_callbacks = [guard, *callbacks]
    if checkpointer is not None:
        run_callbacks.append(
            checkpointing.EpochCheckpoint(
                checkpointer, every_epochs=checkpoint_every_epochs, last_epoch=epochs, guard=guard
            )
        )
    if initial_epoch >= epochs:
        return FitResult(
            model=model,
            status="done",
            history={},
            initial_epoch=initial_epoch,
            epochs_completed=initial_epoch,
            checkpoint=checkpointer.latest if checkpointer else None,
        )
    if run_dir is not None and chief:
        run_dir.write_status("running", initial_epoch=initial_epoch)

    stream = train_stream(train_data, strategy, initial_epoch, epochs, steps_per_epoch)
    history = model.fit(
        stream,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # the order is train_data's, a function of (seed, epoch)
        validation_data=validation_data,
        validation_steps=validation_steps,
        callbacks=run_callbacks,
        verbose=verbose,
    )
    completed = initial_epoch + len(history.epoch)
    status = "done"
    if guard.diverged_at is not None:
        status = "diverged"
        completed = guard.diverged_at["epoch"]
    result = FitResult(
        model=model,
        status=status,
        history=dict(history.history),
        initial_epoch=initial_epoch,
        epochs_completed=completed,
        message=guard.message,
        diverged_at=guard.diverged_at,
        checkpoint=checkpointer.latest if checkpointer else None,
    )
    if run_dir is not None and chief:
        run_dir.write_status(
            status,
            epochs_completed=completed,
            message=result.message,
            diverged_at=result.diverged_at,
            checkpoint=result.checkpoint,
        )
    if status == "diverged":
        print(f"noisy_keras.engine.fit.fit: {result.message}")
    return result

"""Strategies from a short name, the device policy (XLA, op determinism), and logical CPU devices.

Logical CPU devices let `MirroredStrategy` run real multi-replica code on a
laptop and in tests.
"""

import os

import tensorflow as tf

from noisy_keras.engine.registry import DETERMINISM_CHOICES, STRATEGY_NAMES


def configure_logical_cpus(num_devices: int) -> list:
    """Splits the first physical CPU into `num_devices` logical devices.

    Must run before TensorFlow initialises its devices (before the first op).
    Two logical CPU devices let `tf.distribute.MirroredStrategy` run real
    multi-replica code on a machine without GPUs.

    Args:
        num_devices: number of logical CPU devices, >= 1.

    Returns:
        The list of logical CPU devices.

    Raises:
        ValueError: `num_devices` is not a positive integer.
        RuntimeError: devices were already initialised with another count.
    """
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer; received {num_devices!r}.")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError:
        present = tf.config.list_logical_devices("CPU")
        if len(present) != num_devices:
            raise RuntimeError(
                f"TensorFlow's devices are already initialised with {len(present)} logical "
                f"CPU device(s); cannot switch to num_devices={num_devices}. Configure the "
                "devices before the first TensorFlow op."
            ) from None
    return tf.config.list_logical_devices("CPU")


def _check_num_devices(num_devices) -> None:
    if num_devices is None:
        return
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ValueError(
            f"num_devices must be None or a positive integer; received {num_devices!r}."
        )


def make_strategy(name: str = "default", num_devices: int | None = None):
    """Returns a `tf.distribute.Strategy` from a short name and a device count.

    Rule:
        * ``default``: one device, no replication (`tf.distribute.get_strategy()`
          outside any scope); `num_devices` must be None or 1.
        * ``mirrored``: `MirroredStrategy` over `num_devices` GPUs (all visible
          GPUs when None) with NCCL all-reduce. Without GPUs it uses
          `num_devices` logical CPU devices (splitting the CPU with
          `configure_logical_cpus` if TensorFlow is not initialised yet) and
          `ReductionToOneDevice`, since NCCL needs GPUs.
        * ``multiworker``: `MultiWorkerMirroredStrategy` over the machines named
          by the TF_CONFIG environment variable, each using all its local GPUs
          (or its CPU), with NCCL collectives on GPUs and ring collectives
          otherwise. `num_devices` must be None or the number of local GPUs.

    Data parallelism: R replicas each take 1/R of the global batch; Keras
    scales each replica's loss by 1/R and the gradients are SUM-all-reduced,
    so the update is that of the mean loss over the global batch (Goyal et
    al., "Accurate, Large Minibatch SGD", 2017).

    Args:
        name: one of "default", "mirrored", "multiworker".
        num_devices: devices (replicas) on this machine; None for all.

    Returns:
        The strategy. Build and compile the model inside `strategy.scope()`.

    Raises:
        ValueError: unknown `name`, a bad `num_devices`, more devices than
            present, or "multiworker" without TF_CONFIG.
    """
    _check_num_devices(num_devices)
    if name == "default":
        if num_devices not in (None, 1):
            raise ValueError(
                f"num_devices must be None or 1 for name='default'; received {num_devices!r}. "
                "Use name='mirrored' for several devices."
            )
        return tf.distribute.get_strategy()
    if name == "mirrored":
        # Physical, not logical: listing logical devices would initialise TensorFlow's
        # devices before the CPU could be split below.
        gpus = tf.config.list_physical_devices("GPU") and tf.config.list_logical_devices("GPU")
        if gpus:
            count = len(gpus) if num_devices is None else num_devices
            if count > len(gpus):
                raise ValueError(
                    f"num_devices={count} for name='mirrored' but only {len(gpus)} GPU(s) are "
                    f"visible; allowed: 1..{len(gpus)} or None."
                )
            return tf.distribute.MirroredStrategy(
                devices=[d.name for d in gpus[:count]],
                cross_device_ops=tf.distribute.NcclAllReduce() if count > 1 else None,
            )
        if num_devices is None:
            cpus = tf.config.list_logical_devices("CPU")
        else:
            try:
                cpus = configure_logical_cpus(num_devices)
            except RuntimeError:  # already initialised with another count: use what is there
                cpus = tf.config.list_logical_devices("CPU")
        count = len(cpus) if num_devices is None else num_devices
        if count > len(cpus):
            raise ValueError(
                f"num_devices={count} for name='mirrored' but TensorFlow already runs with "
                f"{len(cpus)} logical CPU device(s) and no GPU; allowed: 1..{len(cpus)}, or call "
                f"make_strategy('mirrored', {count}) before the first TensorFlow op."
            )
        return tf.distribute.MirroredStrategy(
            devices=[d.name for d in cpus[:count]],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "name='multiworker' needs the TF_CONFIG environment variable (the cluster and "
                "this worker's task); it is not set. Allowed without it: 'default', 'mirrored'."
            )
        gpus = tf.config.list_physical_devices("GPU")
        if num_devices not in (None, max(len(gpus), 1)):
            raise ValueError(
                f"num_devices for name='multiworker' must be None or the number of local "
                f"devices ({max(len(gpus), 1)}); received {num_devices!r}. Limit GPUs with "
                "CUDA_VISIBLE_DEVICES."
            )
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if gpus
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
    raise ValueError(f"name must be one of {STRATEGY_NAMES}; received {name!r}.")


def worker_index(strategy=None) -> int:
    """This worker's index among the workers of `strategy` (0 without multi-worker)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    return int(resolver.task_id or 0)


def is_chief(strategy=None) -> bool:
    """Whether this process writes the run's files (checkpoints, status, logs).

    Under `MultiWorkerMirroredStrategy` the chief is the task of type "chief",
    or worker 0 when the cluster has no chief; every other setup has one
    process, which is the chief.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type = resolver.task_type
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and not has_chief and int(resolver.task_id or 0) == 0


def resolve_xla(xla, strategy=None) -> bool:
    """Resolves `xla` ("auto", True or False) for the devices of `strategy`.

    Rule for "auto": XLA on when the strategy's replicas run on GPUs (or
    TPUs), off on CPU, where XLA's per-replica compilation measured slower
    for the models of the engine benchmark (docs/how-to/benchmarks.md).

    Raises:
        ValueError: `xla` is not "auto", True or False.
    """
    if xla is True or xla is False:
        return xla
    if xla != "auto":
        raise ValueError(f"xla must be 'auto', True or False; received {xla!r}.")
    strategy = strategy or tf.distribute.get_strategy()
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy has no device list
        devices = ()
    if devices:
        return any(tf.DeviceSpec.from_string(d).device_type in ("GPU", "TPU") for d in devices)
    return bool(tf.config.list_logical_devices("GPU"))


def resolve_determinism(deterministic, *, xla: bool, model_has_max_pooling: bool) -> bool:
    """Whether TensorFlow's op determinism is on for a run (the `--deterministic` policy).

    Rule:
        * "auto" (the default): on without XLA, off with XLA. With XLA on GPUs,
          op determinism makes XLA pick slower deterministic scatter and
          convolution code and refuses max pooling's gradient outright, so it
          is never on by default where it costs something or fails.
        * "true": on. Refused with XLA for a model with max pooling: XLA has no
          deterministic gradient of max pooling (select-and-scatter) on any
          device; TensorFlow fails at the first step with "UNIMPLEMENTED: GPU
          MaxPool gradient ops do not yet have a deterministic XLA
          implementation" (on CPU too).
        * "false": off.

    Either way the added noise is reproducible: it is a function of the seed
    and the update count. Determinism adds bit-identical reruns (and resumes)
    of the data gradients themselves.

    Args:
        deterministic: "auto", "true" or "false" (True and False are taken as
            "true" and "false").
        xla: whether the run compiles its steps with XLA (resolved, see
            `resolve_xla`).
        model_has_max_pooling: whether the model has a max-pooling layer.

    Returns:
        True to call `tf.config.experimental.enable_op_determinism()`.

    Raises:
        ValueError: an unknown `deterministic`, or "true" with XLA and max
            pooling (naming --deterministic, --xla and what is allowed).
    """
    choice = {True: "true", False: "false"}.get(deterministic, deterministic)
    if choice not in DETERMINISM_CHOICES:
        raise ValueError(
            f"deterministic must be one of {', '.join(DETERMINISM_CHOICES)}; received "
            f"deterministic={deterministic!r}."
        )
    if choice == "auto":
        return not xla
    if choice == "false":
        return False
    if xla and model_has_max_pooling:
        raise ValueError(
            "--deterministic=true cannot be combined with XLA (--xla=true, or --xla=auto on "
            "GPUs) for a model with max pooling: XLA has no deterministic max-pooling gradient "
            "on any device. Allowed: --deterministic=auto or --deterministic=false with XLA "
            "(the noise stays reproducible), or --deterministic=true with --xla=false."
        )
    return True

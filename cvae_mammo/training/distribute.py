"""tf.distribute for training: the strategy, who writes, and how batches and the learning rate scale.

``--strategy`` (:data:`~cvae_mammo.models.training_options.STRATEGIES`):

- ``one``: TensorFlow's default strategy, one device;
- ``mirrored``: :class:`tf.distribute.MirroredStrategy` over the GPUs of this machine;
- ``multi-worker``: :class:`tf.distribute.MultiWorkerMirroredStrategy`, one process per
  machine (or per GPU), the cluster read from the standard ``TF_CONFIG`` variable;
- ``auto``: ``multi-worker`` when ``TF_CONFIG`` names several tasks, ``mirrored`` when
  several GPUs are visible, else ``one``.

As the Keras distributed-training guides do: the config's ``batch_size`` is the batch of
one replica, the pipelines batch ``batch_size x replicas`` images (:func:`global_batch`)
and the learning rate grows by the same factor (:func:`scaled_learning_rate`, the linear
scaling rule). Under several workers each one builds the same seeded pipeline and tf.data
shards it by ``AutoShardPolicy.DATA`` (:func:`shard_by_data`): every worker keeps its own
part of each global batch. Only the chief (:func:`is_chief`) writes the run folder,
checkpoints and logs; the others train and write nothing, and on ``--resume`` read the
chief's checkpoint, so the run folder must be on storage every worker sees.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from cvae_mammo.errors import InputError
from cvae_mammo.tf_startup import tf

LOGGER = logging.getLogger(__name__)


def tf_config() -> dict[str, Any] | None:
    """The parsed ``TF_CONFIG`` environment variable (None when unset or empty)."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"TF_CONFIG is not valid JSON ({error})") from error
    if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict):
        raise InputError("TF_CONFIG must be a JSON object with a 'cluster' mapping and a 'task'")
    return value


def _cluster_tasks(config: dict[str, Any] | None) -> int:
    """Number of tasks in TF_CONFIG's cluster (0 without TF_CONFIG)."""
    if config is None:
        return 0
    return sum(len(addresses) for addresses in config["cluster"].values())


class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose ``reduce`` accepts what Keras 3's TensorFlow trainer
    passes it under several workers: a nested batch (keras-team/keras#20329) and scalar
    metrics with ``axis=0`` (tensorflow/tensorflow#72388). Each leaf is reduced on its own,
    a scalar across the replicas."""

    def reduce(self, reduce_op: Any, value: Any, axis: int | None) -> Any:
        """``tf.distribute.Strategy.reduce`` applied to every leaf of ``value``."""
        parent = super()

        def leaf(item: Any) -> Any:
            rank = self.experimental_local_results(item)[0].shape.rank
            return parent.reduce(reduce_op, item, axis if rank else None)

        return tf.nest.map_structure(leaf, value)


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The tf.distribute strategy called ``name`` (see the module docstring).

    Create it before any other TensorFlow operation runs:
    MultiWorkerMirroredStrategy must be set up at program start.
    """
    config = tf_config()
    if name == "auto":
        if _cluster_tasks(config) > 1:
            name = "multi-worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if config is None:
            raise InputError("--strategy multi-worker needs the cluster in TF_CONFIG, e.g. "
                             '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                             '"task": {"type": "worker", "index": 0}}')
        return KerasMultiWorkerStrategy()
    raise InputError(f"strategy {name!r}: choose auto, one, mirrored or multi-worker")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run folder: always, except a non-chief worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return (task_type in (None, "chief")
            or (task_type == "worker" and task_id == 0 and not has_chief))


def global_batch(batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Images per training step over all replicas: the per-replica batch times the replicas."""
    return int(batch_size) * strategy.num_replicas_in_sync


def scaled_learning_rate(learning_rate: float, strategy: tf.distribute.Strategy) -> float:
    """The learning rate for the global batch: linear in the number of replicas."""
    return float(learning_rate) * strategy.num_replicas_in_sync


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data auto-sharding by DATA (each worker keeps its share of the
    elements; the pipelines start from an index list, not from files to shard)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line for the log: strategy class, replicas and this task's role."""
    role = "chief" if is_chief(strategy) else "worker (writes nothing)"
    return (f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s), "
            f"this process: {role}")

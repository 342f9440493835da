"""Training and closed-loop evaluation of small SmolVLA-architecture policies in simulation (ROS-free).

* :mod:`.data` - :func:`load_demos`, :class:`ChunkDataset` (action chunks + ``action_is_pad``),
  :func:`compute_stats`, :func:`random_shift`, :func:`write_demos`;
* :mod:`.trainer` - :func:`small_arch`, :func:`policy_tokenizer`, :class:`TrainConfig`, :func:`train`,
  :func:`masked_loss`;
* :mod:`.grounding` - the training-only grounding loss (privileged simulator object positions; heads not
  saved), :func:`~effvla_ros.train.grounding.grounding_targets`;
* :mod:`.recipes` - named recipes (demo sets + settings) for ``effvla train --recipe``;
* :mod:`.evaluate` - :class:`EvalSetting`, :func:`parse_sweep`, :func:`run_episode`, :func:`evaluate`,
  :func:`evaluate_parallel`, :func:`format_table` (closed loop through TokenCompressor -> PolicyRunner, as
  the ROS nodes); imported on demand (it pulls in the simulator).
"""
from effvla_ros.train.data import ChunkDataset, Episode, compute_stats, load_demos, random_shift, write_demos
from effvla_ros.train.trainer import TrainConfig, TrainResult, masked_loss, policy_tokenizer, small_arch, train

__all__ = [
    "ChunkDataset", "Episode", "TrainConfig", "TrainResult", "compute_stats", "load_demos", "masked_loss",
    "policy_tokenizer", "random_shift", "small_arch", "train", "write_demos",
]

"""Training and closed-loop evaluation of small SmolVLA-architecture policies in simulation (ROS-free).

* :mod:`.data` - :func:`load_demos`, :class:`ChunkDataset` (action chunks + ``action_is_pad``),
  :func:`compute_stats`, :func:`random_shift`, :func:`write_demos`;
* :mod:`.trainer` - :func:`small_arch`, :func:`policy_tokenizer`, :class:`TrainConfig`, :func:`train`;
* :mod:`.losses` - the flow-matching objective: :func:`masked_loss`, and :func:`~effvla_ros.train.losses.flow_pass`
  (the same pass stage by stage, for the training-only losses);
* :mod:`.layout` - an episode's task and cube layout from its seed (the privileged simulator information);
* :mod:`.grounding` - the training-only grounding loss (privileged simulator object positions; heads not
  saved), :func:`~effvla_ros.train.grounding.grounding_targets`;
* :mod:`.relevance`, :mod:`.prune_aware`, :mod:`.color_swap` - relevance alignment, pruning-aware training and
  the colour-swap augmentation;
* :mod:`.recipes` - named recipes (demo sets + settings) for ``effvla train --recipe``;
* :mod:`.evaluate` - :class:`EvalSetting`, :func:`parse_sweep`, :func:`run_episode`, :func:`evaluate`,
  :func:`evaluate_parallel`, :func:`format_table` (closed loop through TokenCompressor -> PolicyRunner, as
  the ROS nodes); imported on demand (it pulls in the simulator).

Imports run one way: ``trainer`` -> ``grounding`` -> ``relevance`` / ``losses`` -> ``layout`` / ``prune_aware``
-> ``data`` (no cycle: ``test/test_package_structure.py`` checks the whole package).
"""
from effvla_ros.train.data import ChunkDataset, Episode, compute_stats, load_demos, random_shift, write_demos
from effvla_ros.train.losses import masked_loss
from effvla_ros.train.trainer import TrainConfig, TrainResult, policy_tokenizer, small_arch, train

__all__ = [
    "ChunkDataset", "Episode", "TrainConfig", "TrainResult", "compute_stats", "load_demos", "masked_loss",
    "policy_tokenizer", "random_shift", "small_arch", "train", "write_demos",
]

"""`tfpar plan`: which parallel degrees (`tfpar.ParallelDims`) fit a model on a cluster.

- `cost`: the model of one layout: memory per device (weights, gradients,
  optimizer, activations), communication and step time;
- `search`: every layout priced, the ones that do not fit rejected, the rest
  ranked, with reasons for the winner (`recommend`);
- `render`: the table, JSON, and the schedule timeline PNG;
- `flags`: the absl flags of `tfpar plan`.

Pure Python: no TensorFlow is imported. Example::

    from tfpar.plan import Hardware, Workload, recommend
    from tfpar.models import SIZES
    plan = recommend(Workload(SIZES["gpt3-175b"], global_batch=1536, recompute="full",
                              precision="mixed_bfloat16"),
                     Hardware(devices=1024, devices_per_node=8, memory_gib=80))
    plan.best.dims          # ParallelDims(dp=16, tp=8, pp=8, microbatches=96, ...)
    plan.best.micro_batch   # 1
"""

from tfpar.plan.cost import ACCELERATORS, Hardware, Workload, memory, variable_bytes
from tfpar.plan.search import Candidate, Plan, PlanError, recommend

__all__ = ["ACCELERATORS", "Candidate", "Hardware", "Plan", "PlanError", "Workload",
           "memory", "recommend", "variable_bytes"]

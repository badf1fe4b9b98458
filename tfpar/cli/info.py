"""`tfpar info`: devices, versions, the strategy the flags would build, the cluster.

`tfpar info --dp=2 --tp=2 --num_simulated_devices=4` describes exactly what
a training script given the same flags would build, without building it.
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from tfpar import flags as tfpar_flags
from tfpar.cli.flags import Command
from tfpar.flags import flag_group


@flag_group
def define_info_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("json", False, "Print JSON instead of text.", flag_values=fv)


def report(fv) -> dict:
    """Devices, versions, the strategy and degrees the flags give, the cluster."""
    import keras
    import tensorflow as tf

    from tfpar import __version__
    from tfpar.cluster import dtensor_env
    from tfpar.devices import simulate_devices

    if fv.num_simulated_devices:
        simulate_devices(fv.num_simulated_devices)
    found = tfpar_flags.discover_from_flags(fv)
    cluster = None if found is None else found.cluster
    name = tfpar_flags.resolve_strategy_name(fv)
    dims = tfpar_flags.dims_from_flags(fv)
    devices = [d.name for d in tf.config.list_logical_devices()]
    gpus = [d for d in devices if "GPU" in d]
    if name == "multi_worker":
        replicas = (len(gpus) or 1) * (cluster.num_workers if cluster else 1)
        if not dims.dp_enabled:  # across workers, every device is a replica
            dims = dataclasses.replace(dims, dp=replicas)
    else:
        replicas = dims.batch_shards
    return {
        "tfpar": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "devices": devices,
        "strategy": {
            "name": name,
            "replicas": replicas,
            "precision": fv.precision,
            "mesh": dims.mesh_spec() if name in ("tensor", "sharded") else None,
            "layouts": fv.layouts if name in ("tensor", "sharded") else None,
        },
        "dims": dims.describe(),
        "cluster": None if cluster is None else {
            "source": found.source,
            "details": dict(found.details),
            "tf_config": cluster.to_tf_config(),
            "num_workers": cluster.num_workers,
            "is_chief": cluster.is_chief,
            "rank": cluster.rank if cluster.task_type in ("chief", "worker") else None,
            "dtensor_env": (dtensor_env(cluster)
                            if cluster.task_type in ("chief", "worker") else None),
        },
    }


def _print_text(r: dict) -> None:
    s = r["strategy"]
    print(f"tfpar {r['tfpar']}  TensorFlow {r['tensorflow']}  "
          f"Keras {r['keras']} ({r['keras_backend']} backend)")
    print(f"devices:  {', '.join(r['devices'])}")
    print(f"strategy: {s['name']} ({s['replicas']} replica(s), precision {s['precision']})")
    d = r["dims"]
    print("dims:     " + " x ".join(f"{k} {d[k]}" for k in ("pp", "dp", "fsdp", "tp"))
          + f" = {d['world_size']} device(s)"
          + (f"; {d['microbatches']} micro-batches, {d['schedule']}" if d["pp"] > 1 else ""))
    c = r["cluster"]
    if c is None:
        print("cluster:  none (single process)")
    else:
        role = "chief" if c["is_chief"] else "worker"
        print(f"cluster:  {c['num_workers']} worker(s); this is rank {c['rank']} ({role}); "
              f"found in {c['source']}")
        print(f"TF_CONFIG: {json.dumps(c['tf_config'])}")


def run(fv, program) -> int:
    r = report(fv)
    if fv.json:
        print(json.dumps(r, indent=2, sort_keys=True))
    else:
        _print_text(r)
    return 0


COMMAND = Command(
    name="info",
    summary="devices, versions, the strategy and degrees the flags give, the cluster",
    usage="[--json] [--dp N] [--tp N] [--pp N] [strategy flags]",
    example="tfpar info --dp=2 --tp=2 --num_simulated_devices=4",
    groups=(("info", define_info_flags),
            ("strategy and parallel degrees", tfpar_flags.define_strategy_flags)),
    run=run,
    uses_tensorflow=True,
)

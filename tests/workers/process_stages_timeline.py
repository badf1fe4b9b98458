"""The timeline of a pipeline whose tensor-parallel stages run in their own processes.

Run under `tfpar launch --nproc K`: every rank trains a 4-block GPT, pp K x tp 2
(2 devices each), with record_timeline=True; rank 0, whose timeline has every
process's spans, prints one JSON line: each lane's actions in the order they
started, and every cross-process dependency whose consumer started before its
producer ended (none expected); and every rank's `predict` and `evaluate`
against the gathered model on one device.
"""

import json
import sys

import keras
import numpy as np

import tfpar
from tfpar.cluster import Cluster
from tfpar.cluster.process_group import ProcessGroup

SCHEDULE, MICROBATCHES = sys.argv[1], int(sys.argv[2])
SHAPE = tfpar.models.GPTConfig(layers=4, hidden=32, heads=2, vocab=64, seq_len=16)


def main():
    cluster = Cluster.from_env()
    tfpar.simulate_devices(2)
    group = ProcessGroup.from_cluster(cluster, heartbeat_timeout_s=30)
    strategy = tfpar.Pipeline(tensor_parallel=2, microbatches=MICROBATCHES, schedule=SCHEDULE,
                              process_group=group, record_timeline=True)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(SHAPE)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
    tokens = np.random.RandomState(0).randint(0, SHAPE.vocab, size=(32, SHAPE.seq_len + 1))
    model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=16, verbose=0)  # 2 steps
    timeline = strategy.timeline
    # Every rank: predictions come from the last stage's process, whole.
    predicted = model.predict(tokens[:16, :-1], batch_size=16, verbose=0)
    loss = model.evaluate(tokens[:16, :-1], tokens[:16, 1:], batch_size=16, verbose=0)
    strategy.gather_weights(model)  # every rank: rank 0's model becomes whole
    if cluster.rank != 0:
        return
    # The gathered model on one device must predict the same logits.
    plain = tfpar.models.gpt(SHAPE)
    plain.set_weights(model.get_weights())
    logits = plain(tokens[:16, :-1]).numpy()
    loss_plain = float(tfpar.models.lm_loss()(tokens[:16, 1:], logits))
    spans = {(s.kind, s.microbatch, s.model_stage): s for s in timeline.of_step()}
    late = []
    for (kind, mb, stage), span in spans.items():
        before = (("F", mb, stage - 1) if kind == "F" else ("B", mb, stage + 1))
        if before in spans and spans[before].stage != span.stage \
                and span.start < spans[before].end:
            late.append(f"{kind}{mb}@{stage}")
    print(json.dumps({"order": {f"{r},{d}": labels for (r, d), labels in
                                timeline.order().items()},
                      "violations": late, "bubble": timeline.bubble_fraction(),
                      "steps": timeline.steps(), "lanes": sorted(map(list, timeline.devices)),
                      "predict_shape": list(predicted.shape),
                      "predict_gap": float(np.abs(predicted - logits).max()),
                      "evaluate_gap": abs(float(loss) - loss_plain)}))


if __name__ == "__main__":
    main()

"""FFC (Wang et al., "An Efficient Training Approach for Very Large Scale Face Recognition", CVPR 2022): a
dynamic class queue of Q gallery features instead of a C x D classifier (behaviour: docs/ffc.md).

    class_queue.py  the queue as a loss operator over Horovod ranks: gather, inserts, both logit sets, gradient,
                    keep / discard a side's changes, state_dict (``DynamicClassQueue``)
    slot_map.py     identity -> slot map with least-recently-used eviction, planned then committed
    queue_loss.py   one logit set's loss: ArcFace / CosFace / SV margin softmax and the hard-negative term
    gallery.py      the gallery net: a forward-only copy of the probe backbone moved towards it by EMA
    method.py       FFC as a training method: the two loaders, probe and gallery nets, sides A and B of a step
"""

"""Bucket plans: reverse registration order, a small first bucket, and no bucket that waits for the
next layer's backward only for that layer's small tensor."""
import numpy

from mpidp import nn
from mpidp.fusion import plan_buckets


def params(*sizes):
    return [nn.Parameter(numpy.zeros(n, numpy.float32)) for n in sizes]


def names(plan, labels):
    return [[labels[i] for i in bucket] for bucket in plan]


def test_reverse_order_and_threshold():
    ps = params(10, 10, 10, 10)
    assert plan_buckets(ps, 80) == [[3, 2], [1, 0]]
    assert plan_buckets(ps, 80, first_bucket_bytes=40) == [[3], [2, 1], [0]]


def test_layer_bias_goes_with_its_weight():
    # an mlp's Linear layers register weight then bias; backward produces both at once, last layer first
    labels = ["0.w", "0.b", "2.w", "2.b", "4.w", "4.b", "6.w", "6.b"]
    ps = params(1024 * 64, 1024, 1024 * 1024, 1024, 1024 * 1024, 1024, 10 * 1024, 10)
    plan = plan_buckets(ps, 8 << 20, first_bucket_bytes=1 << 20)
    # failed before this change: [["6.b", "6.w", "4.b"], ["4.w", "2.b"], ["2.w", "0.b", "0.w"]]: each bucket
    # waited for the next layer's backward only for its 4 KiB bias
    assert names(plan, labels) == [["6.b", "6.w"], ["4.b", "4.w"], ["2.b", "2.w", "0.b", "0.w"]]


def test_small_tensors_still_fill_a_bucket():
    # a run of small tensors (norm layers, biases) is not split one by one
    ps = params(*([256] * 8))
    assert plan_buckets(ps, 4 * 1024) == [[7, 6, 5, 4], [3, 2, 1, 0]]
    assert sum(len(b) for b in plan_buckets(params(100, 3000, 100, 3000), 16000)) == 4


def test_kinds_never_share_a_bucket():
    ps = [nn.Parameter(numpy.zeros(4, numpy.float32)), nn.Parameter(numpy.zeros(4, numpy.float64)),
          nn.Parameter(numpy.zeros(4, numpy.float32))]
    assert plan_buckets(ps, 1 << 20) == [[2], [1], [0]]


def test_no_lone_small_bucket_before_a_tensor_bigger_than_a_bucket():
    # a norm layer's parameters before a conv weight larger than the threshold: they cannot join it
    ps = params(2000, 10, 10, 500)  # conv (8000 B), norm weight, norm bias, conv (2000 B)
    assert plan_buckets(ps, 4000) == [[3, 2, 1], [0]]

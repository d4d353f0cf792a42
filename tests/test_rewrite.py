"""The rewrite stage (convrewrite.rewrite): each rewrite is exact against the model it came from, run at
training=False with randomized BatchNormalization statistics and biases (never the trivial 0/1 ones) on
random inputs, and refuses the patterns its docstring says are not exact."""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import rewrite
from convrewrite.errors import PlanError, VerificationError
from convrewrite.rewrite import kernels
from convrewrite.verify import check_rewrites, relative_error

L = keras.layers
RTOL = 1e-5


def randomize(model, seed=0):
    """Non-trivial BN statistics (mean, variance, gamma, beta) and conv biases, in place."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            values = {"gamma": rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n), "beta": rng.normal(size=n),
                      "moving_mean": rng.normal(size=n), "moving_variance": rng.uniform(0.3, 3.0, n)}
            for name, value in values.items():
                if getattr(layer, name, None) is not None:
                    getattr(layer, name).assign(value.astype("float32"))
        elif getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return model


def run(model, seed=1):
    """(original at training=False, rewritten) outputs on one random normal batch, and the rewrite records."""
    randomize(model)
    new, records = rewrite.apply(model)
    shape = [2 if d is None else d for d in model.inputs[0].shape]
    x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    try:
        expected = np.asarray(model(x, training=False))
    except Exception as exc:  # noqa: BLE001 - TF-CPU runs no channels_first conv
        if "channels_first" in str(model.layers[1].get_config().get("data_format")):
            pytest.skip(f"this backend cannot run the channels_first original ({type(exc).__name__})")
        raise
    return expected, np.asarray(new(x, training=False)), records, new


def kinds(records):
    return [r.kind for r in records]


def conv_bn(conv, input_shape, bn=None, after=None):
    x = inp = keras.Input(input_shape)
    y = (bn or L.BatchNormalization())(conv(x))
    if after is not None:
        y = after(y)
    return keras.Model(inp, y)


FOLD_CASES = {
    "conv2d_same": (lambda: L.Conv2D(6, 3, padding="same"), (9, 9, 4), None),
    "conv2d_valid_s2_nobias": (lambda: L.Conv2D(6, 3, strides=2, use_bias=False), (9, 9, 4), None),
    "conv2d_groups": (lambda: L.Conv2D(6, 3, padding="same", groups=2), (8, 8, 4), None),
    "conv2d_dilated": (lambda: L.Conv2D(5, 3, padding="same", dilation_rate=2), (10, 10, 3), None),
    "depthwise2d_multiplier": (lambda: L.DepthwiseConv2D(5, padding="same", depth_multiplier=2), (8, 8, 3), None),
    "depthwise1d": (lambda: L.DepthwiseConv1D(3, padding="same"), (12, 4), None),
    "conv2d_transpose_s2": (lambda: L.Conv2DTranspose(5, 3, strides=2, padding="same"), (6, 6, 4), None),
    "conv1d_causal": (lambda: L.Conv1D(6, 5, padding="causal"), (16, 3), None),
    "conv1d_transpose": (lambda: L.Conv1DTranspose(4, 3, strides=2), (7, 3), None),
    "conv3d": (lambda: L.Conv3D(4, 3, padding="same"), (5, 5, 5, 2), None),
    "bn_no_center_no_scale_eps": (lambda: L.Conv2D(6, 3), (8, 8, 3),
                                  lambda: L.BatchNormalization(center=False, scale=False, epsilon=0.3)),
    "bn_axis_positive": (lambda: L.Conv2D(6, 1), (8, 8, 3), lambda: L.BatchNormalization(axis=3)),
    "channels_first": (lambda: L.Conv2D(6, 3, padding="same", data_format="channels_first"), (3, 8, 8),
                       lambda: L.BatchNormalization(axis=1)),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_fold_bn_is_exact(case):
    conv, shape, bn = FOLD_CASES[case]
    expected, actual, records, new = run(conv_bn(conv(), shape, bn() if bn else None))
    assert kinds(records) == ["fold_bn"]
    assert not any(isinstance(layer, L.BatchNormalization) for layer in new.layers)
    assert relative_error(actual, expected) <= RTOL


def test_fold_bn_channels_first_depthwise_is_exact():
    model = conv_bn(L.DepthwiseConv2D(3, padding="same", data_format="channels_first"), (4, 8, 8),
                    L.BatchNormalization(axis=1))
    expected, actual, records, _ = run(model)
    assert kinds(records) == ["fold_bn"] and relative_error(actual, expected) <= RTOL


def _two_readers():
    x = inp = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 3, padding="same")(x)
    return keras.Model(inp, [L.BatchNormalization()(y), L.ReLU()(y)])


def _bn_training():
    x = inp = keras.Input((8, 8, 3))
    return keras.Model(inp, L.BatchNormalization()(L.Conv2D(4, 3)(x), training=True))


def _conv_with_activation():
    return conv_bn(L.Conv2D(4, 3, activation="relu"), (8, 8, 3))


def _shared_conv():
    x = inp = keras.Input((8, 8, 4))
    conv = L.Conv2D(4, 3, padding="same")
    return keras.Model(inp, conv(L.BatchNormalization()(conv(x))))


def _bn_wrong_axis():
    return conv_bn(L.Conv2D(4, 3), (8, 8, 3), L.BatchNormalization(axis=1))


def _conv_is_output():
    x = inp = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 3)(x)
    return keras.Model(inp, [y, L.BatchNormalization()(y)])


@pytest.mark.parametrize("build", [_two_readers, _bn_training, _conv_with_activation, _shared_conv, _bn_wrong_axis,
                                   _conv_is_output], ids=lambda f: f.__name__.strip("_"))
def test_nothing_folded_where_not_exact(build):
    model = build()
    randomize(model)
    new, records = rewrite.apply(model)
    assert "fold_bn" not in kinds(records)
    assert sum(isinstance(layer, L.BatchNormalization) for layer in new.layers) == \
        sum(isinstance(layer, L.BatchNormalization) for layer in model.layers)


def repvgg_block(x, filters, strides=1, groups=1, identity=True):
    """3x3 conv + BN, 1x1 conv + BN, and (stride 1, same width) a BN of the input, summed, then ReLU."""
    a = L.BatchNormalization()(L.Conv2D(filters, 3, strides, padding="same", groups=groups, use_bias=False)(x))
    b = L.BatchNormalization()(L.Conv2D(filters, 1, strides, padding="same", groups=groups, use_bias=False)(x))
    branches = [a, b] + ([L.BatchNormalization()(x)] if identity else [])
    return L.ReLU()(L.Add()(branches))


@pytest.mark.parametrize("groups", [1, 2])
def test_repvgg_block_merges_into_one_conv(groups):
    inp = keras.Input((10, 10, 8))
    model = keras.Model(inp, repvgg_block(repvgg_block(inp, 8, groups=groups), 8, groups=groups))
    expected, actual, records, new = run(model)
    assert [type(layer).__name__ for layer in new.layers] == ["InputLayer", "Conv2D", "Conv2D"]
    assert kinds(records).count("merge_branches") == 2 and kinds(records).count("fuse_activation") == 2
    assert relative_error(actual, expected) <= RTOL


@pytest.mark.parametrize("size", [15, 16])
def test_strided_branches_merge_where_tf_padding_puts_them(size):
    # TF's 'same' at stride 2 pads a 3x3 by 0 before an even input (1 after) but by 1 before an odd one: the
    # 1x1 goes to the window's first tap on even sizes, to its centre on odd ones
    inp = keras.Input((size, size, 4))
    model = keras.Model(inp, repvgg_block(inp, 6, strides=2, identity=False))
    expected, actual, records, _ = run(model)
    assert "merge_branches" in kinds(records)
    assert relative_error(actual, expected) <= RTOL


def test_strided_branches_of_unknown_size_are_not_merged():
    inp = keras.Input((None, None, 4))
    _, records = rewrite.apply(keras.Model(inp, repvgg_block(inp, 6, strides=2, identity=False)))
    assert "merge_branches" not in kinds(records)


def replk_block(x, large=11, small=3, dilation=1):
    a = L.BatchNormalization()(L.DepthwiseConv2D(large, padding="same", use_bias=False)(x))
    b = L.BatchNormalization()(L.DepthwiseConv2D(small, padding="same", dilation_rate=dilation, use_bias=False)(x))
    return L.Add()([a, b])


@pytest.mark.parametrize("small,dilation,merged", [(3, 1, True), (5, 2, True), (3, 5, False)])
def test_depthwise_branches_merge_dilated_only_where_no_larger(small, dilation, merged):
    inp = keras.Input((16, 16, 4))
    model = keras.Model(inp, replk_block(inp, 9, small, dilation))
    expected, actual, records, new = run(model)
    assert ("merge_branches" in kinds(records)) is merged
    if merged:
        assert [layer.kernel_size for layer in new.layers[1:]] == [(9, 9)]
    assert relative_error(actual, expected) <= RTOL


def test_raw_identity_and_conv1d_branches_merge():
    inp = keras.Input((20, 6))
    y = L.Add()([inp, L.Conv1D(6, 5, padding="same")(inp), L.Conv1D(6, 1)(inp)])
    expected, actual, records, new = run(keras.Model(inp, y))
    assert kinds(records) == ["merge_branches"] and new.layers[1].kernel_size == (5,)
    assert relative_error(actual, expected) <= RTOL


def test_add_of_a_foreign_tensor_is_not_merged():
    inp = keras.Input((8, 8, 4))
    other = L.Conv2D(4, 1)(inp)
    y = L.Add()([L.Conv2D(4, 3, padding="same")(other), L.Conv2D(4, 1)(inp)])
    _, records = rewrite.apply(keras.Model(inp, y))
    assert "merge_branches" not in kinds(records)


@pytest.mark.parametrize("act,fused", [(lambda: L.ReLU(), True), (lambda: L.ReLU(max_value=6.0), True),
                                       (lambda: L.Activation("swish"), True), (lambda: L.ReLU(negative_slope=0.1), False)],
                         ids=["relu", "relu6", "swish", "leaky"])
def test_activation_fused_into_conv(act, fused):
    inp = keras.Input((8, 8, 3))
    expected, actual, records, new = run(keras.Model(inp, act()(L.Conv2D(4, 3)(inp))))
    assert ("fuse_activation" in kinds(records)) is fused
    assert relative_error(actual, expected) <= RTOL


def test_activation_not_fused_where_the_preactivation_is_read():
    inp = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 3)(inp)
    _, records = rewrite.apply(keras.Model(inp, [L.ReLU()(y), y]))
    assert not records


def test_kernel_helpers():
    k = np.arange(4.0).reshape(2, 2, 1, 1)[:1]  # (1, 2, 1, 1)
    assert kernels.dilate(k, (1, 3), 2)[0, :, 0, 0].tolist() == [0, 0, 0, 1]
    assert kernels.pad_centred(np.ones((1, 1, 1, 1)), (3, 3), 2)[:, :, 0, 0].tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert kernels.pad_to(np.ones((1, 1, 1, 1)), (3, 3), (0, 2), 2)[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert [(n, kernels.same_padding_before(n, 3, 2)) for n in (15, 16)] == [(15, 1), (16, 0)]
    ident = kernels.identity_kernel((3, 3), 4, 2, kernels.CONV)  # (3, 3, 2, 4)
    assert ident[1, 1].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    with pytest.raises(ValueError, match="centre"):
        kernels.pad_centred(np.ones((2, 2, 1, 1)), (3, 3), 2)


def _small_repvgg():
    inp = keras.Input((12, 12, 4))
    return keras.Model(inp, repvgg_block(repvgg_block(inp, 4), 4), name="small_repvgg")


def test_optimize_rewrites_by_default_and_reports_it(tmp_path):
    model = randomize(_small_repvgg())
    fast = convrewrite.optimize(model, cost_model=None)
    plan = fast.convrewrite_plan
    assert plan.mode == "inference" and len(plan) == 2
    assert "2 parallel-branch blocks merged" in plan.summary()
    assert convrewrite.planner.Plan.from_dict(plan.to_dict()).rewrites == plan.rewrites
    assert [c.kind for c in fast.convrewrite_report.checks].count("rewrite") == 2
    assert convrewrite.verify(model, fast).passed
    x = np.random.default_rng(3).standard_normal((2, 12, 12, 4)).astype("float32")
    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    assert relative_error(np.asarray(loaded(x)), np.asarray(model(x, training=False))) <= RTOL


def test_training_mode_keeps_the_graph():
    model = _small_repvgg()
    fast = convrewrite.optimize(model, cost_model=None, mode="training")
    assert fast.convrewrite_plan.rewrites == [] and len(fast.convrewrite_plan) == 4
    assert sum(isinstance(layer, L.BatchNormalization) for layer in fast.layers) == 6
    with pytest.raises(PlanError, match="mode='fast'"):
        convrewrite.optimize(model, mode="fast")


def test_a_wrong_fold_fails_verification(monkeypatch):
    """A rewrite that drops the BN's shift is caught by the rewrite check and end to end."""
    model = randomize(conv_bn(L.Conv2D(4, 3), (8, 8, 3)))
    monkeypatch.setattr(kernels, "fold", lambda kernel, bias, s, t, layout: (
        kernels.scale_output_channels(kernel, s, layout), np.zeros(len(s)) if bias is None else bias * s))
    with pytest.raises(VerificationError, match="rewrite stage"):
        convrewrite.optimize(model, cost_model=None)


def test_mobilenet_v2_is_exact_after_folding():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), alpha=0.35)
    expected, actual, records, new = run(model)
    assert kinds(records).count("fold_bn") == 52 and "fuse_activation" in kinds(records)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in new.layers)
    assert relative_error(actual, expected) <= RTOL


def test_rewrite_checks_span_the_original_across_passes():
    """A conv whose input came from a folded conv -> BN: its fused span starts at the BN's output."""
    inp = keras.Input((8, 8, 3))
    y = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inp))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(y)))
    model = randomize(keras.Model(inp, y))
    new, records = rewrite.apply(model)
    checks = check_rewrites(model, new, [r.to_dict() for r in records])
    assert len(checks) == 2 and all(c.passed for c in checks), [c.rel_error for c in checks]


def test_plan_and_build_take_the_mode():
    model = randomize(_small_repvgg())
    plan = convrewrite.plan(model, cost_model=None)
    assert plan.mode == "inference" and len(plan) == 2 and len(plan.rewrites) == 8  # 4 folds, 2 merges, 2 fusions
    assert len(convrewrite.plan(model, cost_model=None, mode="training")) == 4
    built = convrewrite.api.build(model, plan)  # makes the plan's rewrites again
    x = np.random.default_rng(5).standard_normal((2, 12, 12, 4)).astype("float32")
    assert relative_error(np.asarray(built(x)), np.asarray(model(x, training=False))) <= RTOL


def test_branch_read_elsewhere_is_not_merged():
    inp = keras.Input((8, 8, 4))
    a = L.Conv2D(4, 3, padding="same")(inp)
    y = L.Add()([a, L.Conv2D(4, 1)(inp)])
    _, records = rewrite.apply(keras.Model(inp, [y, a]))
    assert "merge_branches" not in kinds(records)


def test_channels_first_branches_merge():
    inp = keras.Input((4, 10, 10))
    a = L.BatchNormalization(axis=1)(L.Conv2D(4, 3, padding="same", data_format="channels_first")(inp))
    b = L.Conv2D(4, 1, data_format="channels_first")(inp)
    expected, actual, records, _ = run(keras.Model(inp, L.Add()([a, b, L.BatchNormalization(axis=1)(inp)])))
    assert "merge_branches" in kinds(records)
    assert relative_error(actual, expected) <= RTOL


@pytest.mark.parametrize("seed", range(6))
def test_random_branch_blocks_are_exact_merged_or_not(seed):
    """Seeded random blocks (kernel sizes, strides, input size parity, groups, identity): where merged, exact."""
    r = np.random.default_rng(seed)
    size, strides, groups = int(r.integers(7, 13)), int(r.choice([1, 2])), int(r.choice([1, 2]))
    inp = keras.Input((size, size, 4))
    branches = [L.BatchNormalization()(L.Conv2D(4, int(k), strides, padding="same", groups=groups)(inp))
                for k in sorted(set(r.choice([1, 3, 5], size=2)))]
    if strides == 1 and r.random() < 0.5:
        branches.append(L.BatchNormalization()(inp))
    if len(branches) < 2:
        branches.append(L.Conv2D(4, 1, strides, groups=groups)(inp))
    expected, actual, records, _ = run(keras.Model(inp, L.Add()(branches)), seed=seed)
    assert "merge_branches" in kinds(records)
    assert relative_error(actual, expected) <= RTOL

"""Tests for the built-in numpy trainers, the training config and the dense-chain model helpers."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from device_agent.trainers import (
    EvalResult,
    MLPTrainer,
    SoftmaxTrainer,
    TrainConfig,
    Trainer,
    loss_and_gradients,
)
from fedmq.models import (
    DEFAULT_LAYER_SIZES,
    Weights,
    flatten,
    init_mlp,
    layer_sizes_of,
    num_parameters,
    unflatten,
)


def _blobs(
    n: int, features: int, classes: int, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Separable-ish Gaussian blobs: learnable quickly, so loss must drop."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(0, 1, size=(n, features))
    return x.astype(np.float32), y.astype(np.int64)


def _copy(w: Weights) -> Weights:
    return {k: v.copy() for k, v in w.items()}


# --- models -------------------------------------------------------------------------------------


def test_init_mlp_names_shapes_dtype_and_order() -> None:
    w = init_mlp([5, 4, 3, 2], seed=1)
    assert list(w) == [
        "dense0.weight",
        "dense0.bias",
        "dense1.weight",
        "dense1.bias",
        "dense2.weight",
        "dense2.bias",
    ]
    assert w["dense0.weight"].shape == (5, 4)
    assert w["dense1.weight"].shape == (4, 3)
    assert w["dense2.bias"].shape == (2,)
    assert all(t.dtype == np.float32 for t in w.values())
    assert not w["dense0.bias"].any()
    assert w["dense0.weight"].std() > 0
    assert layer_sizes_of(w) == [5, 4, 3, 2]
    assert num_parameters(w) == 5 * 4 + 4 + 4 * 3 + 3 + 3 * 2 + 2


def test_init_mlp_is_seeded() -> None:
    a, b, c = init_mlp([8, 6, 3], 7), init_mlp([8, 6, 3], 7), init_mlp([8, 6, 3], 8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["dense0.weight"], c["dense0.weight"])


def test_default_layers_roundtrip() -> None:
    assert layer_sizes_of(init_mlp(DEFAULT_LAYER_SIZES, 0)) == list(DEFAULT_LAYER_SIZES)


@pytest.mark.parametrize("sizes", [[], [3], [3, 0], [0, 3], [4, -1, 2]])
def test_init_mlp_rejects_bad_sizes(sizes: list[int]) -> None:
    with pytest.raises(ValueError, match="layer"):
        init_mlp(sizes, 0)


def test_layer_sizes_of_rejects_non_chains() -> None:
    good = init_mlp([4, 3, 2], 0)
    with pytest.raises(ValueError, match="pairs"):
        layer_sizes_of({})
    with pytest.raises(ValueError, match="pairs"):
        layer_sizes_of({"dense0.weight": good["dense0.weight"]})
    swapped = {"dense0.bias": good["dense0.bias"], "dense0.weight": good["dense0.weight"]}
    with pytest.raises(ValueError, match="expected tensors"):
        layer_sizes_of(swapped)
    with pytest.raises(ValueError, match="not dense-layer names"):
        layer_sizes_of({"conv.weight": good["dense0.weight"], "conv.bias": good["dense0.bias"]})
    bad_bias = _copy(good)
    bad_bias["dense0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"dense0\.bias must have shape"):
        layer_sizes_of(bad_bias)
    broken_chain = _copy(good)
    broken_chain["dense1.weight"] = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="previous layer outputs 3"):
        layer_sizes_of(broken_chain)
    not_matrix = _copy(good)
    not_matrix["dense0.weight"] = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match="2-D"):
        layer_sizes_of(not_matrix)


def test_flatten_unflatten_roundtrip() -> None:
    w = init_mlp([6, 5, 3], 2)
    v = flatten(w)
    assert v.dtype == np.float64
    assert v.shape == (num_parameters(w),)
    back = unflatten(v, w)
    assert list(back) == list(w)
    assert all(np.array_equal(back[k], w[k]) and back[k].dtype == np.float32 for k in w)
    with pytest.raises(ValueError, match="parameters"):
        unflatten(v[:-1], w)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[4, 3], [4, 5, 3], [4, 6, 5, 3]])
def test_gradients_match_finite_differences(sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    w64: dict[str, npt.NDArray[Any]] = {
        k: v.astype(np.float64) for k, v in init_mlp(sizes, 3).items()
    }
    # Non-zero biases so the check also covers them away from the init point.
    for k, v in w64.items():
        if k.endswith("bias"):
            v[:] = rng.normal(0, 0.1, size=v.shape)
    x = rng.normal(size=(7, sizes[0]))
    y = rng.integers(0, sizes[-1], size=7)
    _, grads = loss_and_gradients(w64, x, y)
    assert list(grads) == list(w64)
    eps = 1e-6
    for name, tensor in w64.items():
        numeric = np.zeros_like(tensor)
        for idx in np.ndindex(tensor.shape):
            orig = tensor[idx]
            tensor[idx] = orig + eps
            up, _ = loss_and_gradients(w64, x, y)
            tensor[idx] = orig - eps
            down, _ = loss_and_gradients(w64, x, y)
            tensor[idx] = orig
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_loss_is_log_num_classes_for_zero_weights() -> None:
    w = {k: np.zeros_like(v) for k, v in init_mlp([3, 4], 0).items()}
    x = np.ones((5, 3), np.float32)
    loss, _ = loss_and_gradients(w, x, np.arange(5) % 4)
    assert loss == pytest.approx(np.log(4), rel=1e-6)


# --- fit / evaluate -----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[10, 4], [10, 16, 4], [10, 16, 8, 4]])
def test_fit_reduces_loss_and_raises_accuracy(sizes: list[int]) -> None:
    x, y = _blobs(200, 10, 4, seed=1)
    trainer = MLPTrainer(x, y, num_classes=4)
    w0 = init_mlp(sizes, 0)
    before = trainer.evaluate(w0)
    result = trainer.fit(w0, TrainConfig(epochs=5, batch_size=16, lr=0.05), round_seed=0)
    after = trainer.evaluate(result.weights)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy is not None
    assert after.accuracy > 0.9
    assert result.num_examples == 200
    assert set(result.metrics) == {"train_loss", "train_accuracy"}
    assert np.isfinite(result.metrics["train_loss"])
    assert list(result.weights) == list(w0)
    assert all(result.weights[k].dtype == np.float32 for k in w0)
    assert all(result.weights[k].shape == w0[k].shape for k in w0)


def test_fit_is_deterministic_and_seeded() -> None:
    x, y = _blobs(60, 6, 3, seed=2)
    trainer = MLPTrainer(x, y, 3)
    w0 = init_mlp([6, 8, 3], 1)
    cfg = TrainConfig(epochs=3, batch_size=7, lr=0.1, seed=5)
    a = trainer.fit(w0, cfg, round_seed=4)
    b = MLPTrainer(x.copy(), y.copy(), 3).fit(_copy(w0), cfg, round_seed=4)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in w0)
    assert a.metrics == b.metrics
    other_round = trainer.fit(w0, cfg, round_seed=5)
    other_seed = trainer.fit(w0, TrainConfig(epochs=3, batch_size=7, lr=0.1, seed=6), 4)
    assert not np.array_equal(a.weights["dense0.weight"], other_round.weights["dense0.weight"])
    assert not np.array_equal(a.weights["dense0.weight"], other_seed.weights["dense0.weight"])


def test_fit_and_evaluate_do_not_mutate_inputs() -> None:
    x, y = _blobs(50, 5, 3, seed=3)
    x_before, y_before = x.copy(), y.copy()
    trainer = MLPTrainer(x, y, 3)
    w0 = init_mlp([5, 7, 3], 2)
    snapshot = _copy(w0)
    result = trainer.fit(w0, TrainConfig(epochs=2, batch_size=4, lr=0.5), round_seed=1)
    trainer.evaluate(w0)
    assert all(np.array_equal(w0[k], snapshot[k]) for k in w0)
    assert all(not np.shares_memory(result.weights[k], w0[k]) for k in w0)
    assert not np.array_equal(result.weights["dense0.weight"], w0["dense0.weight"])
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)


def test_fit_accepts_batch_larger_than_data_and_float64_weights() -> None:
    x, y = _blobs(9, 4, 2, seed=4)
    w64 = {k: v.astype(np.float64) for k, v in init_mlp([4, 2], 0).items()}
    res = MLPTrainer(x, y, 2).fit(w64, TrainConfig(epochs=1, batch_size=100, lr=0.1), 0)  # type: ignore[arg-type]
    assert all(t.dtype == np.float32 for t in res.weights.values())


def test_evaluate_matches_manual_accuracy() -> None:
    x, y = _blobs(30, 4, 3, seed=5)
    w = init_mlp([4, 3], 9)
    res = MLPTrainer(x, y, 3).evaluate(w)
    logits = x @ w["dense0.weight"] + w["dense0.bias"]
    assert isinstance(res, EvalResult)
    assert res.num_examples == 30
    assert res.accuracy == pytest.approx(float((logits.argmax(1) == y).mean()))
    loss, _ = loss_and_gradients(w, x, y)
    assert res.loss == pytest.approx(loss, rel=1e-5)


def test_trainers_satisfy_protocol() -> None:
    x, y = _blobs(10, 4, 2, seed=6)
    assert isinstance(MLPTrainer(x, y, 2), Trainer)
    assert isinstance(SoftmaxTrainer(x, y, 2), Trainer)


def test_softmax_trainer_rejects_hidden_layers() -> None:
    x, y = _blobs(10, 4, 2, seed=7)
    trainer = SoftmaxTrainer(x, y, 2)
    trainer.fit(init_mlp([4, 2], 0), TrainConfig(epochs=1), 0)
    with pytest.raises(ValueError, match="single dense layer"):
        trainer.fit(init_mlp([4, 3, 2], 0), TrainConfig(epochs=1), 0)


def test_trainer_rejects_mismatched_models_and_data() -> None:
    x, y = _blobs(10, 4, 3, seed=8)
    trainer = MLPTrainer(x, y, 3)
    with pytest.raises(ValueError, match="features"):
        trainer.evaluate(init_mlp([5, 3], 0))
    with pytest.raises(ValueError, match="classes"):
        trainer.fit(init_mlp([4, 2], 0), TrainConfig(), 0)
    with pytest.raises(ValueError, match="round_seed"):
        trainer.fit(init_mlp([4, 3], 0), TrainConfig(), -1)
    with pytest.raises(ValueError, match="2-D"):
        MLPTrainer(x[0], y[:1], 3)
    with pytest.raises(ValueError, match="one label per row"):
        MLPTrainer(x, y[:-1], 3)
    with pytest.raises(ValueError, match="labels must be in"):
        MLPTrainer(x, y, 2)
    with pytest.raises(ValueError, match="integer class labels"):
        MLPTrainer(x, y.astype(np.float32), 3)
    with pytest.raises(ValueError, match="no local examples"):
        MLPTrainer(x[:0], y[:0], 3)
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MLPTrainer(x_nan, y, 3)


# --- TrainConfig --------------------------------------------------------------------------------


def test_train_config_from_mapping() -> None:
    assert TrainConfig.from_mapping({}) == TrainConfig()
    cfg = TrainConfig.from_mapping(
        {"epochs": 3, "batch_size": 16, "lr": 1, "seed": 9, "momentum": 0.9, "future": "x"}
    )
    # Keys TrainConfig has no field for are kept in ``extra`` for custom trainers.
    assert cfg == TrainConfig(epochs=3, batch_size=16, lr=1.0, seed=9,
                              extra={"momentum": 0.9, "future": "x"})
    assert isinstance(cfg.lr, float)


def test_train_config_extra_is_a_private_copy_and_not_hashed() -> None:
    extra: dict[str, float | int | str] = {"l2": 0.001}
    cfg = TrainConfig(extra=extra)
    extra["l2"] = 5.0
    assert cfg.extra == {"l2": 0.001}
    assert hash(cfg) == hash(TrainConfig())


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"shuffle": True}, "'shuffle' must be a number or a string"),
     ({"sizes": [1, 2]}, "'sizes' must be a number or a string"),
     ({"beta": float("nan")}, "'beta' must be finite"),
     ({"lr": 0.1}, "'lr' is a TrainConfig field")],
)
def test_train_config_refuses_extra_values_the_wire_cannot_carry(
        extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(extra=extra)
    if "lr" not in extra:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_mapping(extra)


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"epochs": "5"}, "epochs"),
        ({"epochs": 10**9}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": None}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"lr": False}, "lr"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_train_config_rejects_bad_values(mapping: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        TrainConfig.from_mapping(mapping)


def test_train_config_validates_direct_construction() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=-3)


def test_fedprox_adds_mu_times_the_distance_to_the_global_model_to_each_step() -> None:
    """Two minibatch steps by hand: the second one's gradient gains mu * (w1 - w_global)."""
    from device_agent.trainers import loss_and_gradients
    from fedmq.models import init_mlp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=8)
    w0 = init_mlp([4, 5, 3], seed=2)
    mu, lr = 0.5, 0.1
    config = TrainConfig(epochs=1, batch_size=4, lr=lr, seed=3, proximal_mu=mu)
    got = MLPTrainer(x, y, num_classes=3).fit(w0, config, round_seed=9).weights

    order = np.random.default_rng([3, 9]).permutation(8)  # the trainer's shuffle
    w = {k: v.astype(np.float64) for k, v in w0.items()}
    for step in range(2):
        rows = order[step * 4:(step + 1) * 4]
        _, grads = loss_and_gradients(w, x[rows].astype(np.float64), y[rows])
        w = {k: w[k] - lr * (grads[k] + mu * (w[k] - w0[k])) for k in w}
    for name in w0:
        np.testing.assert_allclose(got[name], w[name], rtol=1e-5, atol=1e-6, err_msg=name)
    plain = MLPTrainer(x, y, num_classes=3).fit(
        w0, TrainConfig(epochs=1, batch_size=4, lr=lr, seed=3), round_seed=9).weights
    assert not all(np.allclose(got[k], plain[k]) for k in w0)  # mu changed the second step


def test_fedprox_mu_arrives_in_the_announcement() -> None:
    assert TrainConfig.from_mapping({"proximal_mu": 0.01}).proximal_mu == 0.01
    assert TrainConfig.from_mapping({}).proximal_mu == 0.0
    for bad in (-1.0, float("nan"), 1e9, True, "0.1"):
        with pytest.raises(ValueError, match="proximal_mu"):
            TrainConfig.from_mapping({"proximal_mu": bad})


def test_the_aggregator_announces_proximal_mu_only_when_it_is_on() -> None:
    from aggregator.publishing import Publisher
    from fedmq import codec
    from fedmq.config import AggregatorConfig, TrainSettings
    from fedmq.memory_transport import MemoryTransport
    from fedmq.topics import Topics
    from fedmq.wire import RoundAnnouncement

    for mu, expected in ((0.0, None), (0.01, 0.01)):
        transport = MemoryTransport()
        config = AggregatorConfig(federation="f", train=TrainSettings(proximal_mu=mu))
        Publisher(config, transport, Topics("f"), None).announce(
            round_=1, version=0, run=1, deadline=10.0)
        ann = codec.decode_as(transport.published[-1].payload, RoundAnnouncement)
        assert ann.train.get("proximal_mu") == expected
        assert TrainConfig.from_mapping(ann.train).proximal_mu == (expected or 0.0)

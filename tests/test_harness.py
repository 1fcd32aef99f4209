"""The simulated-staleness harness against one-arrival-at-a-time loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax
from dcasgd_optax.harness import SimState
from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import SyncSimulator
from dcasgd_optax.harness import schedules

W = 4  # workers
A = 24  # arrivals
XS = jax.random.normal(jax.random.key(0), (64, 3))
YS = jnp.sin(XS @ jnp.array([1.0, -2.0, 0.5]))


def loss_fn(params, idx):
  """A tiny tanh network on closed-over data; ``idx`` picks the batch."""
  h = jnp.tanh(XS[idx] @ params["w1"] + params["b1"][None])
  return jnp.mean((h @ params["w2"] - YS[idx]) ** 2)


def bn_loss_fn(params, model_state, idx):
  """The network with a batch-norm layer: train-mode stats, EMA of the mean."""
  z = XS[idx] @ params["w1"]
  mean, var = jnp.mean(z, axis=0), jnp.var(z, axis=0)
  z = (z - mean[None]) / jnp.sqrt(var[None] + 1e-5)
  h = jnp.tanh(z + params["b1"][None])
  loss = jnp.mean((h @ params["w2"] - YS[idx]) ** 2)
  new_state = {
      "mean": 0.9 * model_state["mean"] + 0.1 * mean,
      "count": model_state["count"] + 1,
  }
  return loss, new_state


def init_params():
  k1, k2 = jax.random.split(jax.random.key(1))
  return {
      "w1": 0.5 * jax.random.normal(k1, (3, 5)),
      "b1": jnp.zeros((5,)),
      "w2": 0.5 * jax.random.normal(k2, (5,)),
  }


def init_model_state():
  return {"mean": jnp.zeros((5,)), "count": jnp.zeros((), jnp.int32)}


def make_batches(num, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (num, 8)))


def random_order(num_workers, num, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, num_workers, num).astype(np.int32)


ORDERS = {
    "cyclic": lambda: schedules.cyclic(W, A),
    "shuffled": lambda: schedules.shuffled_rounds(W, A // W, seed=1),
    "gamma": lambda: schedules.gamma_speeds(W, A, seed=2, shape=3.0,
                                            speeds=[1.0, 2.0, 1.0, 0.5]),
    "random": lambda: random_order(W, A, seed=3),
}
OPTIMIZERS = {
    "dcasgd_a": lambda: dcasgd_optax.dcasgd(0.1, W, adaptive=True),
    "dcasgd_c": lambda: dcasgd_optax.dcasgd(0.1, W, adaptive=False,
                                            lambda_=0.5, momentum=0.9),
    "adam": lambda: optax.adam(0.02),
}


def reference_replay(tx, params, batches, arrivals, *, model_state=None):
  """One arrival at a time, in Python, with per-worker copies kept in lists.

  Each worker's params and model state live in Python lists (not read from
  the optimizer's backups), so this loop shares nothing with the simulator
  but ``tx`` itself. Plain optax optimizers get ``worker``/``staleness``
  only if they contain a DelayCompensationState.
  """
  stateful = model_state is not None
  opt_state = tx.init(params)
  has_dc = bool(dcasgd_optax._src.pull.find_states(opt_state))
  held = [params] * W
  held_ms = [model_state] * W
  last_pull, losses, taus = [0] * W, [], []
  for k, m in enumerate(np.asarray(arrivals).tolist()):
    if stateful:
      (loss, new_ms), g = jax.value_and_grad(bn_loss_fn, has_aux=True)(
          held[m], held_ms[m], batches[k])
      model_state = held_ms[m] = new_ms
    else:
      loss, g = jax.value_and_grad(loss_fn)(held[m], batches[k])
    taus.append(k - last_pull[m])
    extra = dict(worker=m, staleness=taus[-1]) if has_dc else {}
    updates, opt_state = tx.update(g, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    if has_dc:
      opt_state = dcasgd_optax.record_pull(opt_state, params, m)
    held[m], last_pull[m] = params, k + 1
    losses.append(loss)
  return params, np.array(losses), np.array(taus), held, model_state


STRATEGIES = ("compiled", "host_chunks")


def assert_trees_close(a, b, tol=2e-5):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b
  )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_replay_matches_one_at_a_time_loop(order, opt, strategy):
  arrivals, batches = ORDERS[order](), make_batches(A)
  sim = Simulator(loss_fn, OPTIMIZERS[opt](), W, strategy=strategy)
  state, metrics = sim.replay(sim.init(init_params()), batches, arrivals)
  params, losses, taus, held, _ = reference_replay(
      OPTIMIZERS[opt](), init_params(), batches, arrivals)
  assert_trees_close(state.params, params)
  np.testing.assert_allclose(metrics["loss"], losses, rtol=2e-5)
  np.testing.assert_array_equal(metrics["staleness"], taus)
  np.testing.assert_array_equal(metrics["worker"], arrivals)
  for m in range(W):  # what each worker holds is the backup, exactly
    assert_trees_close(dcasgd_optax.worker_params(state.opt_state, m), held[m])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_staleness_is_exact_and_reported_as_int32(strategy):
  arrivals = random_order(W, 60, seed=5)
  sim = Simulator(loss_fn, optax.sgd(0.05), W, strategy=strategy)
  state, metrics = sim.replay(sim.init(init_params()), make_batches(60),
                              arrivals)
  assert metrics["staleness"].dtype == jnp.int32
  np.testing.assert_array_equal(metrics["staleness"],
                                schedules.staleness(arrivals, W))
  assert int(state.step) == 60
  last = [max(k + 1 for k in range(60) if arrivals[k] == m) for m in range(W)]
  np.testing.assert_array_equal(state.last_pull, last)


def test_inverse_staleness_scaling_receives_the_staleness():
  tx = lambda: optax.chain(dcasgd_optax.scale_by_inverse_staleness(),
                           optax.sgd(0.1))
  arrivals, batches = random_order(W, A, seed=6), make_batches(A)
  sim = Simulator(loss_fn, tx(), W)
  state, _ = sim.replay(sim.init(init_params()), batches, arrivals)
  # Through a λ=0 delay compensation, so the reference passes staleness too.
  ref_tx = optax.chain(dcasgd_optax.delay_compensation(W, 0.0), tx())
  params, *_ = reference_replay(ref_tx, init_params(), batches, arrivals)
  assert_trees_close(state.params, params)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resuming_equals_one_replay(strategy):
  arrivals, batches = random_order(W, 40, seed=7), make_batches(40)
  tx = lambda: dcasgd_optax.dcasgd(0.1, W)
  sim = Simulator(loss_fn, tx(), W, strategy=strategy)
  whole, m_whole = sim.replay(sim.init(init_params()), batches, arrivals)
  part, m1 = sim.replay(sim.init(init_params()), batches[:17], arrivals[:17])
  part, m2 = sim.replay(part, batches[17:], arrivals[17:])
  assert_trees_close(part, whole, tol=1e-6)
  np.testing.assert_array_equal(
      np.concatenate([m1["staleness"], m2["staleness"]]), m_whole["staleness"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_is_bitwise_deterministic(strategy):
  arrivals, batches = random_order(W, A, seed=8), make_batches(A)
  sim = Simulator(loss_fn, dcasgd_optax.dcasgd(0.1, W), W, strategy=strategy)
  runs = [sim.replay(sim.init(init_params()), batches, arrivals) for _ in "ab"]
  jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunking_is_as_planned(strategy):
  arrivals = schedules.cyclic(W, A)
  sim = Simulator(loss_fn, optax.sgd(0.1), W, strategy=strategy)
  assert sim.describe(arrivals, init_params()) == dict(
      num_arrivals=A, num_runs=A // W, chunk=W, num_chunks=A // W,
      fill_ratio=1.0, strategy=strategy)
  sim = Simulator(loss_fn, optax.sgd(0.1), W, max_parallel=3,
                  strategy=strategy)
  plan = sim.describe([0, 1, 2, 3, 0, 1, 2, 3, 0], init_params())
  assert plan["num_runs"] == 3 and plan["num_chunks"] == 5  # 2+2, 2+2, 1
  assert plan["chunk"] == 2 and plan["fill_ratio"] == 9 / 10


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("max_parallel,vmap_slots", [(1, None), (None, 2),
                                                     (None, W), (3, 3)])
def test_batching_options_do_not_change_the_result(max_parallel, vmap_slots,
                                                   strategy):
  arrivals, batches = random_order(W, A, seed=4), make_batches(A)
  tx = lambda: dcasgd_optax.dcasgd(0.1, W)
  default = Simulator(loss_fn, tx(), W)
  other = Simulator(loss_fn, tx(), W, max_parallel=max_parallel,
                    vmap_slots=vmap_slots, strategy=strategy)
  a, _ = default.replay(default.init(init_params()), batches, arrivals)
  b, _ = other.replay(other.init(init_params()), batches, arrivals)
  assert_trees_close(a.params, b.params, tol=1e-6)


def test_sequential_sgd_is_one_worker():
  batches = make_batches(A)
  sim = Simulator(loss_fn, optax.sgd(0.1), 1)
  state, metrics = sim.replay(sim.init(init_params()), batches,
                              np.zeros(A, np.int32))
  params = init_params()
  for k in range(A):
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params,
                          jax.grad(loss_fn)(params, batches[k]))
  assert_trees_close(state.params, params)
  assert not np.any(metrics["staleness"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batchnorm_model_state_follows_its_worker(strategy):
  arrivals, batches = random_order(W, A, seed=9), make_batches(A)
  tx = lambda: dcasgd_optax.dcasgd(0.1, W)
  sim = Simulator(bn_loss_fn, tx(), W, has_model_state=True,
                  strategy=strategy)
  state = sim.init(init_params(), init_model_state())
  state, metrics = sim.replay(state, batches, arrivals)
  params, losses, _, _, model_state = reference_replay(
      tx(), init_params(), batches, arrivals, model_state=init_model_state())
  assert_trees_close(state.params, params)
  assert_trees_close(state.model_state, model_state)
  np.testing.assert_allclose(metrics["loss"], losses, rtol=2e-5)
  counts = np.bincount(arrivals, minlength=W)
  np.testing.assert_array_equal(state.worker_model_states["count"], counts)


def test_non_finite_losses_are_reported():
  batches = make_batches(8).at[5].set(10**6)  # out-of-range index: NaN rows
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  nan_loss = lambda p, i: jnp.where(i[0] > 64, jnp.nan, loss_fn(p, i % 64))
  sim = Simulator(nan_loss, optax.sgd(0.1), W)
  _, metrics = sim.replay(sim.init(init_params()), batches,
                          schedules.cyclic(W, 8))
  assert np.isnan(metrics["loss"][5])
  assert np.all(np.isfinite(metrics["loss"][:5]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_is_donated_unless_asked_not_to(strategy):
  arrivals, batches = schedules.cyclic(W, 8), make_batches(8)
  params = init_params()
  for donate in (True, False):
    sim = Simulator(loss_fn, optax.sgd(0.1), W, donate=donate,
                    strategy=strategy)
    state = sim.init(params)
    sim.replay(state, batches, arrivals)
    assert state.params["w1"].is_deleted() == donate
  assert not params["w1"].is_deleted()  # init copies its argument


IMAGES = jax.random.normal(jax.random.key(2), (64, 6, 6, 1))


def conv_loss_fn(params, idx):
  """A tiny convolutional net: the kind "host_chunks" exists for."""
  h = jax.lax.conv_general_dilated(
      IMAGES[idx], params["k"], (2, 2), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.mean((jnp.tanh(h).reshape(idx.shape[0], -1) @ params["d"]
                   - YS[idx]) ** 2)


def test_strategies_agree_on_a_convnet_with_more_workers_than_a_chunk():
  num_workers = 12  # "host_chunks" chunks hold at most 8 slots per device
  params = {"k": jnp.full((3, 3, 1, 4), 0.1), "d": jnp.linspace(-0.1, 0.1, 36)}
  arrivals = schedules.gamma_speeds(num_workers, 40, seed=0, shape=2.0)
  batches = make_batches(40)
  results = []
  for strategy in STRATEGIES:
    sim = Simulator(conv_loss_fn, dcasgd_optax.dcasgd(0.02, num_workers),
                    num_workers, strategy=strategy)
    assert sim.describe(arrivals, params)["chunk"] <= (
        8 if strategy == "host_chunks" else num_workers)
    results.append(sim.replay(sim.init(params), batches, arrivals))
  assert np.all(np.isfinite(results[0][1]["loss"]))
  assert_trees_close(results[0], results[1], tol=1e-5)


def test_sync_strategies_agree_with_rounds_of_several_groups():
  num_workers = 19  # "host_chunks": 3 groups of 7 slots per round
  batches = make_batches(2 * num_workers)
  results = []
  for strategy in STRATEGIES:
    sim = SyncSimulator(bn_loss_fn, dcasgd_optax.dcasgd(0.1, num_workers),
                        num_workers, has_model_state=True, strategy=strategy)
    results.append(sim.replay(sim.init(init_params(), init_model_state()),
                              batches))
  assert_trees_close(results[0], results[1], tol=1e-5)


def test_unknown_strategy_raises():
  with pytest.raises(ValueError, match="strategy"):
    Simulator(loss_fn, optax.sgd(0.1), W, strategy="python")
  with pytest.raises(ValueError, match="strategy"):
    SyncSimulator(loss_fn, optax.sgd(0.1), W, strategy="python")


def test_default_strategy_on_cpu_is_host_chunks():
  assert jax.default_backend() == "cpu"
  assert Simulator(loss_fn, optax.sgd(0.1), W).strategy == "host_chunks"
  assert SyncSimulator(loss_fn, optax.sgd(0.1), W).strategy == "host_chunks"


def reference_sync(tx, params, batches, rounds):
  opt_state = tx.init(params)
  for r in range(rounds):
    grads = [jax.grad(loss_fn)(params, batches[r * W + j]) for j in range(W)]
    mean = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0), *grads)
    updates, opt_state = tx.update(mean, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("vmap_slots", [None, W])
def test_sync_simulator_averages_gradients_per_round(vmap_slots, strategy):
  batches = make_batches(5 * W)
  sim = SyncSimulator(loss_fn, optax.sgd(0.1, momentum=0.9), W,
                      vmap_slots=vmap_slots, strategy=strategy)
  state, metrics = sim.replay(sim.init(init_params()), batches)
  params = reference_sync(optax.sgd(0.1, momentum=0.9), init_params(),
                          batches, 5)
  assert_trees_close(state.params, params)
  assert metrics["loss"].shape == (5 * W,) and int(state.step) == 5
  assert not np.any(metrics["staleness"])
  dc = SyncSimulator(loss_fn, dcasgd_optax.dcasgd(0.1, W, momentum=0.9), W,
                     strategy=strategy)
  dc_state, _ = dc.replay(dc.init(init_params()), batches)
  assert_trees_close(dc_state.params, params)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sync_simulator_averages_model_state(strategy):
  sim = SyncSimulator(bn_loss_fn, optax.sgd(0.1), W, has_model_state=True,
                      strategy=strategy)
  state, _ = sim.replay(sim.init(init_params(), init_model_state()),
                        make_batches(2 * W))
  assert int(state.model_state["count"]) == 2
  assert state.model_state["mean"].shape == (5,)


BAD_ARRIVALS = {
    "out_of_range": np.array([0, 1, W]),
    "negative": np.array([0, -1, 2]),
    "float": np.array([0.0, 1.0, 2.0]),
    "bool": np.array([True, False, True]),
    "two_d": np.zeros((3, 1), np.int32),
    "empty": np.zeros((0,), np.int32),
}


@pytest.mark.parametrize("name", sorted(BAD_ARRIVALS))
def test_bad_arrivals_raise_before_running(name):
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  state = sim.init(init_params())
  arrivals = BAD_ARRIVALS[name]
  with pytest.raises(ValueError, match="arrivals"):
    sim.replay(state, make_batches(len(arrivals)), arrivals)
  assert not state.params["w1"].is_deleted()


def test_batches_must_match_arrivals():
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  with pytest.raises(ValueError, match="batches"):
    sim.replay(sim.init(init_params()), make_batches(5), schedules.cyclic(W, 4))


def test_num_workers_must_match_the_optimizer():
  sim = Simulator(loss_fn, dcasgd_optax.dcasgd(0.1, W + 1), W)
  with pytest.raises(ValueError, match="num_workers"):
    sim.init(init_params())


def test_loss_fn_must_return_a_scalar():
  sim = Simulator(lambda p, i: XS[i] @ p["w1"], optax.sgd(0.1), W)
  with pytest.raises(ValueError, match="scalar"):
    sim.replay(sim.init(init_params()), make_batches(4), schedules.cyclic(W, 4))


def test_model_state_must_match_the_flag():
  with pytest.raises(ValueError, match="has_model_state"):
    Simulator(loss_fn, optax.sgd(0.1), W).init(init_params(), {"a": 1.0})
  with pytest.raises(ValueError, match="has_model_state"):
    Simulator(bn_loss_fn, optax.sgd(0.1), W, has_model_state=True).init(
        init_params())


def test_state_must_come_from_a_simulator_of_this_size():
  small = Simulator(loss_fn, optax.sgd(0.1), W - 1).init(init_params())
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  with pytest.raises(ValueError, match="num_workers"):
    sim.replay(small, make_batches(4), schedules.cyclic(W - 1, 4))
  with pytest.raises(ValueError, match="SimState"):
    sim.replay(tuple(small), make_batches(4), schedules.cyclic(W - 1, 4))


def test_sync_batches_must_fill_rounds():
  sim = SyncSimulator(loss_fn, optax.sgd(0.1), W)
  with pytest.raises(ValueError, match="R \\* num_workers"):
    sim.replay(sim.init(init_params()), make_batches(W + 1))


def test_sim_state_is_arrays_only():
  state = Simulator(loss_fn, optax.sgd(0.1), W).init(init_params())
  assert isinstance(state, SimState)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_sync_replay_rejects_a_state_from_another_simulator():
  params = {"w": jnp.zeros(3)}
  loss = lambda p, b: jnp.sum((p["w"] - b) ** 2)
  batches = jnp.ones((4, 3))
  async_state = Simulator(loss, optax.sgd(0.1), 2).init(params)
  sync = SyncSimulator(loss, optax.sgd(0.1), 2)
  with pytest.raises(ValueError, match="opt_state"):
    sync.replay(async_state, batches)
  with pytest.raises(ValueError, match="workers"):
    sync.replay(SyncSimulator(loss, optax.sgd(0.1), 4).init(params), batches)
  state, _ = sync.replay(sync.init(params), batches)  # its own state works
  assert int(state.step) == 2

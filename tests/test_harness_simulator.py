"""Simulator: the asynchronous replay against a one-arrival-at-a-time loop."""

import re

import chex
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

from helpers import REPLAY_TOL
from helpers import STRATEGIES
from helpers import XS
from helpers import YS
from helpers import A
from helpers import W
from helpers import bn_loss_fn
from helpers import find_dc_states
from helpers import init_model_state
from helpers import init_params
from helpers import loss_fn
from helpers import make_batches
from helpers import random_order

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
  has_dc = bool(find_dc_states(opt_state))
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


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_replay_matches_one_at_a_time_loop(order, opt, strategy):
  arrivals, batches = ORDERS[order](), make_batches(A)
  sim = Simulator(loss_fn, OPTIMIZERS[opt](), W, strategy=strategy)
  state, metrics = sim.replay(sim.init(init_params()), batches, arrivals)
  params, losses, taus, held, _ = reference_replay(
      OPTIMIZERS[opt](), init_params(), batches, arrivals)
  chex.assert_trees_all_close(state.params, params, **REPLAY_TOL)
  np.testing.assert_allclose(metrics["loss"], losses, rtol=2e-5)
  np.testing.assert_array_equal(metrics["staleness"], taus)
  np.testing.assert_array_equal(metrics["worker"], arrivals)
  for m in range(W):  # what each worker holds is the backup, exactly
    chex.assert_trees_all_close(
        dcasgd_optax.worker_params(state.opt_state, m), held[m], **REPLAY_TOL
    )


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
  chex.assert_trees_all_close(state.params, params, **REPLAY_TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resuming_equals_one_replay(strategy):
  arrivals, batches = random_order(W, 40, seed=7), make_batches(40)
  tx = lambda: dcasgd_optax.dcasgd(0.1, W)
  sim = Simulator(loss_fn, tx(), W, strategy=strategy)
  whole, m_whole = sim.replay(sim.init(init_params()), batches, arrivals)
  part, m1 = sim.replay(sim.init(init_params()), batches[:17], arrivals[:17])
  part, m2 = sim.replay(part, batches[17:], arrivals[17:])
  chex.assert_trees_all_close(part, whole, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      np.concatenate([m1["staleness"], m2["staleness"]]), m_whole["staleness"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_is_bitwise_deterministic(strategy):
  arrivals, batches = random_order(W, A, seed=8), make_batches(A)
  sim = Simulator(loss_fn, dcasgd_optax.dcasgd(0.1, W), W, strategy=strategy)
  runs = [sim.replay(sim.init(init_params()), batches, arrivals) for _ in "ab"]
  chex.assert_trees_all_equal(runs[0], runs[1])


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
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-6)


def test_sequential_sgd_is_one_worker():
  batches = make_batches(A)
  sim = Simulator(loss_fn, optax.sgd(0.1), 1)
  state, metrics = sim.replay(sim.init(init_params()), batches,
                              np.zeros(A, np.int32))
  params = init_params()
  for k in range(A):
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params,
                          jax.grad(loss_fn)(params, batches[k]))
  chex.assert_trees_all_close(state.params, params, **REPLAY_TOL)
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
  chex.assert_trees_all_close(state.params, params, **REPLAY_TOL)
  chex.assert_trees_all_close(state.model_state, model_state, **REPLAY_TOL)
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
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_unknown_strategy_raises():
  with pytest.raises(ValueError, match="strategy"):
    Simulator(loss_fn, optax.sgd(0.1), W, strategy="python")
  with pytest.raises(ValueError, match="strategy"):
    SyncSimulator(loss_fn, optax.sgd(0.1), W, strategy="python")


def test_default_strategy_on_cpu_is_picked_per_loss_function():
  assert jax.default_backend() == "cpu"
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  assert sim.strategy is None
  arrivals = schedules.cyclic(W, 8)
  assert sim.describe(arrivals, init_params(), make_batches(8))[
      "strategy"] == "compiled"  # matrix products: one program
  params = {"k": jnp.full((3, 3, 1, 4), 0.1), "d": jnp.linspace(-0.1, 0.1, 36)}
  conv = Simulator(conv_loss_fn, optax.sgd(0.1), W)
  assert conv.describe(arrivals, params, make_batches(8))[
      "strategy"] == "host_chunks"  # convolutions: out of any loop
  with pytest.raises(ValueError, match="batches"):
    sim.describe(arrivals, init_params())
  assert SyncSimulator(loss_fn, optax.sgd(0.1), W).strategy == "host_chunks"


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


def test_sim_state_is_arrays_only():
  state = Simulator(loss_fn, optax.sgd(0.1), W).init(init_params())
  assert isinstance(state, SimState)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def reference_held_from_backups(tx, params, batches, arrivals, tx_pulls=None):
  """One arrival at a time; each worker computes at what its backup holds.

  The pull is :func:`dcasgd_optax.pull` after the update, unless ``tx``
  pulls inside it (``tx_pulls``; by default its type says).
  """
  if tx_pulls is None:
    tx_pulls = isinstance(tx, dcasgd_optax.PullAfterPush)
  opt_state = tx.init(params)
  for k, m in enumerate(np.asarray(arrivals).tolist()):
    held = dcasgd_optax.worker_params(opt_state, m)
    g = jax.grad(loss_fn)(held, batches[k])
    updates, opt_state = tx.update(g, opt_state, params, worker=m)
    params = optax.apply_updates(params, updates)
    if not tx_pulls:
      _, opt_state = dcasgd_optax.pull(opt_state, params, m)
  return params, opt_state


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("make_tx", [
    lambda: dcasgd_optax.dana_dcasgd(0.1, W, momentum=0.8),
    lambda: optax.chain(dcasgd_optax.delay_compensation(W, 0.5),
                        dcasgd_optax.look_ahead_momentum(0.1, 0.8, 3)),
], ids=["pulls_in_update", "pulled_by_simulator"])
def test_workers_compute_at_the_look_ahead_they_pulled(make_tx, strategy):
  """A look-ahead pull (the worker holds a prediction, not the server's
  model) reaches the simulated workers whether ``tx`` pulls inside its update
  (a PullAfterPush) or the simulator pulls for it."""
  arrivals, batches = random_order(W, A, seed=11), make_batches(A)
  sim = Simulator(loss_fn, make_tx(), strategy=strategy)
  state, _ = sim.replay(sim.init(init_params()), batches, arrivals)
  params, opt_state = reference_held_from_backups(
      make_tx(), init_params(), batches, arrivals)
  chex.assert_trees_all_close(state.params, params, **REPLAY_TOL)
  for m in range(W):  # the pull the tx made is what the worker holds
    chex.assert_trees_all_close(
        dcasgd_optax.worker_params(state.opt_state, m),
        dcasgd_optax.worker_params(opt_state, m), **REPLAY_TOL)


def backup_writes(sim, params, num_workers):
  """How many row writes into the backups one arrival's program executes.

  Counted in the lowered StableHLO: ops (scatters, dynamic-update-slices)
  taking and returning the backups' type, through the functions ``@main``
  calls (a function called twice counts twice). The model is a vector of 7,
  so no other array has that type. One arrival: no loop runs it twice.
  """
  state = sim.init(params)
  text = sim.lower(state, np.zeros((1, 1), np.int32), np.arange(1)).as_text()
  backups = f"tensor<{num_workers}x7xf32>"
  write = re.compile(rf"\({backups}, [^)]*\) -> {backups}")
  bodies, name = {}, None
  for line in text.splitlines():
    found = re.match(r"\s*func\.func \w+ @([\w.]+)\(", line)
    if found:
      name = found.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)

  def count(name):
    calls = [re.search(r"func\.call @([\w.]+)\(", x) for x in bodies[name]]
    direct = sum(bool(write.search(x)) and c is None
                 for x, c in zip(bodies[name], calls))
    return direct + sum(count(c.group(1)) for c in calls if c)

  return count("main")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("make_tx", [
    lambda: dcasgd_optax.dcasgd(0.1, W),
    lambda: dcasgd_optax.pull_after_push(optax.chain(
        dcasgd_optax.delay_compensation(W, 0.5), optax.sgd(0.1))),
    lambda: optax.chain(dcasgd_optax.delay_compensation(W, 0.5),
                        optax.sgd(0.1)),
    lambda: optax.inject_hyperparams(
        dcasgd_optax.dcasgd, static_args=("num_workers",))(
            learning_rate=0.1, num_workers=W),
    lambda: optax.chain(optax.clip(1.0), dcasgd_optax.dana_dcasgd(0.1, W)),
], ids=["dcasgd", "pull_after_push", "pulled_by_simulator",
        "inject_hyperparams", "chain_ending_in_it"])
def test_each_arrival_writes_its_pull_once(make_tx, strategy):
  """The pull is written once per arrival: by ``tx`` if it pulls inside its
  update (its state says so, also under wrappers that hide a PullAfterPush),
  else by the simulator, never by both."""
  xs = jnp.linspace(0.0, 1.0, 4 * 7).reshape(4, 7)
  vector_loss = lambda p, i: jnp.sum((xs[i] @ p["w"]) ** 2)
  sim = Simulator(vector_loss, make_tx(), strategy=strategy)
  assert backup_writes(sim, {"w": jnp.ones(7)}, W) == 1


N = 3  # simulations replayed together


def injected_dcasgd():
  """DC-ASGD with the learning rate and λ carried in the state."""
  return optax.inject_hyperparams(
      dcasgd_optax.dcasgd, static_args=("num_workers",))(
          learning_rate=0.1, num_workers=W, lambda_=2.0)


def stacked(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shared_arrivals", [True, False])
def test_replay_many_equals_separate_replays(shared_arrivals, strategy):
  sim = Simulator(loss_fn, injected_dcasgd(), strategy=strategy)
  params = [jax.tree.map(lambda x, i=i: x * (1.0 + 0.1 * i), init_params())
            for i in range(N)]
  lrs, lams = jnp.array([0.05, 0.1, 0.2]), jnp.array([0.0, 1.0, 4.0])
  arrivals = [random_order(W, A, seed=20 + (0 if shared_arrivals else i))
              for i in range(N)]
  batches = [make_batches(A, seed=30 + i) for i in range(N)]
  states = sim.init_many(stacked(params),
                         hyperparams={"learning_rate": lrs, "lambda_": lams})
  states, record = sim.replay_many(
      states, stacked(batches),
      arrivals[0] if shared_arrivals else np.stack(arrivals))
  for i in range(N):
    state = sim.init(params[i])
    hyper = dict(state.opt_state.hyperparams, learning_rate=lrs[i],
                 lambda_=lams[i])
    state = state._replace(opt_state=state.opt_state._replace(
        hyperparams=hyper))
    state, alone = sim.replay(state, batches[i], arrivals[i])
    chex.assert_trees_all_close(
        jax.tree.map(lambda x, i=i: x[i], states), state, **REPLAY_TOL)
    for key, value in alone.items():
      assert record[key].shape == (N, A), key
      chex.assert_trees_all_close(record[key][i], value, **REPLAY_TOL)


def test_replay_many_rejects_what_replay_would_and_more():
  sim = Simulator(loss_fn, injected_dcasgd())
  states = sim.init_many(stacked([init_params()] * N))
  batches = jnp.stack([make_batches(4)] * N)
  with pytest.raises(ValueError, match="leading axis"):
    sim.replay_many(sim.init(init_params()), batches[0], schedules.cyclic(W, 4))
  with pytest.raises(ValueError, match="arrivals"):
    sim.replay_many(states, batches, np.zeros((N + 1, 4), np.int32))
  with pytest.raises(ValueError, match="N, len\\(arrivals\\)"):
    sim.replay_many(states, batches[:2], schedules.cyclic(W, 4))
  with pytest.raises(ValueError, match="momentum"):
    sim.init_many(stacked([init_params()] * N),
                  hyperparams={"momentum": jnp.ones(N)})
  assert not states.params["w1"].is_deleted()


@pytest.mark.parametrize("make_tx, tx_pulls", [
    (lambda: optax.inject_hyperparams(
        dcasgd_optax.dana_dcasgd, static_args=("num_workers",))(
            learning_rate=0.1, num_workers=W, momentum=0.8), True),
    (lambda: optax.chain(optax.clip(1.0), dcasgd_optax.dana_dcasgd(
        0.1, W, momentum=0.8)), True),
    # A member after it changes the updates: the pull it recorded is not of
    # the server's new model, so the simulator must pull (again).
    (lambda: optax.chain(dcasgd_optax.dana_dcasgd(0.1, W, momentum=0.8),
                         optax.scale(0.5)), False),
], ids=["inject_hyperparams", "chain_ending_in_it", "chain_after_it"])
def test_wrapped_pull_after_push_is_pulled_exactly_once(make_tx, tx_pulls):
  """Under wrappers that hide the PullAfterPush type, the workers hold what
  a loop gives that pulls once, after ``tx``'s own pull only where ``tx``'s
  updates are the pull-after-push's (a look-ahead pull: pulling with the
  wrong params, or missing the pull, changes what the worker holds)."""
  arrivals, batches = random_order(W, A, seed=12), make_batches(A)
  sim = Simulator(loss_fn, make_tx(), strategy="compiled")
  state, _ = sim.replay(sim.init(init_params()), batches, arrivals)
  params, opt_state = reference_held_from_backups(
      make_tx(), init_params(), batches, arrivals, tx_pulls=tx_pulls)
  chex.assert_trees_all_close(state.params, params, **REPLAY_TOL)
  for m in range(W):
    chex.assert_trees_all_close(
        dcasgd_optax.worker_params(state.opt_state, m),
        dcasgd_optax.worker_params(opt_state, m), **REPLAY_TOL)

"""dcasgd_optax.ray.train on a local Ray, against independent references.

The real runs are replayed: one shard against the simulator (the trace's
arrival order and batches give the same final params), several shards
against a one-push-at-a-time NumPy loop driven by each shard's own trace,
one worker against a sequential optax loop. Failures live in
test_ray_faults.py (slow), a two-node cluster in test_ray_cluster.py (slow).
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ray_helpers import alive_actors
from ray_helpers import check_exactly_once
from ray_helpers import digits_problem
from ray_helpers import local_ray  # noqa: F401  # a fixture
from ray_helpers import ray
from ray_helpers import ray_env  # noqa: F401  # a fixture
from ray_helpers import trace_batches

pytest.importorskip("orbax.checkpoint")

import dcasgd_optax  # pylint: disable=g-import-not-at-top
from dcasgd_optax.harness import Simulator  # pylint: disable=g-import-not-at-top
from dcasgd_optax.harness import schedules  # pylint: disable=g-import-not-at-top
import dcasgd_optax.ray as dray  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray._layout import make_layout  # pylint: disable=g-import-not-at-top

# ray.init forks after JAX has started threads; the children exec at once.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def _bf16(x):
  return np.asarray(x).astype(jnp.bfloat16).astype(np.float32)


@pytest.mark.usefixtures("local_ray")
def test_one_shard_run_replays_exactly_in_the_simulator():
  loss_fn, data_fn, params, accuracy = digits_problem()
  tx = dcasgd_optax.dcasgd(0.5, num_workers=3)
  result = dray.train(loss_fn, tx, params, data_fn, num_updates=90)
  rec = result.records
  assert result.step == 90 and isinstance(rec, dict)
  np.testing.assert_array_equal(rec.step, np.arange(1, 91))
  np.testing.assert_array_equal(rec["staleness"], rec.staleness)
  check_exactly_once(rec, 3)
  assert not rec.skipped.any() and set(rec.worker.tolist()) == {0, 1, 2}
  assert accuracy(result.params) > 0.8  # Chance is 0.1.
  # The simulator, fed the trace's arrival order and the same batches.
  sim = Simulator(loss_fn, tx, num_workers=3)
  state, metrics = sim.replay(sim.init(params), trace_batches(data_fn, rec),
                              schedules.from_trace(rec, num_workers=3))
  np.testing.assert_array_equal(metrics["staleness"], rec.staleness)
  # On this machine (JAX 0.10 and 0.12) the params and optax state come out
  # bitwise equal and the losses within 2 ulps; the tolerance allows a few
  # ulps of compiler difference, no more.
  np.testing.assert_allclose(metrics["loss"], rec.loss, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(state.params, result.params, rtol=1e-6,
                              atol=1e-7)
  chex.assert_trees_all_close(state.opt_state, result.opt_state, rtol=1e-6,
                              atol=1e-7)
  assert 0.0 < result.server_share < 1.0 and result.shard_times.shape == (1,)
  # One node, shared_memory=True (the default): every push used the channel.
  assert result.shard_records[0]["shared"].all()
  assert not alive_actors()


def _dc_step(lr, lam):
  """DC-ASGD-c on one shard's pieces: ``(shard, w, backup, g) -> w``."""
  return lambda _, w, b, g: [w - lr * (x + lam * x * x * (w - b_))
                             for w, x, b_ in zip(w, g, b)]


def _per_example_mean_square(loss_fn, params, batch):
  """The mean over the batch of the per-example squared gradients."""
  one = lambda p, x, y: loss_fn(p, (x[None], y[None]))
  per_example = jax.vmap(jax.grad(one), (None, 0, 0))(params, *batch)
  with np.errstate(over="ignore"):  # An overflow is the push's to skip.
    return jax.tree.map(lambda g: np.mean(np.square(g), 0), per_example)


def _sharded_reference(loss_fn, data_fn, params, layout, traces, step,
                       push_grad_sq=False):
  """``step`` on each shard's slice, one push at a time, in each shard's
  own order (``traces``): a worker computes gradient ``s`` (and with
  ``push_grad_sq`` its per-example mean square, passed to ``step`` after
  it) once every shard processed its gradient ``s - 1``, at the pieces
  they sent back; a push with anything not finite is skipped."""
  split = lambda tree: [[np.asarray(p, np.float32) for p in s]
                        for s in layout.split(tree)]
  shards = split(jax.device_get(params))
  num_workers = 1 + max(int(t["worker"].max()) for t in traces)
  held = [[list(s) for s in shards] for _ in range(num_workers)]
  backups = [[list(s) for s in shards] for _ in range(num_workers)]
  done = np.full((len(traces), num_workers), -1)
  grads, pos = {}, [0] * len(traces)
  grad_fn = jax.grad(loss_fn)
  while any(p < len(t["worker"]) for p, t in zip(pos, traces)):
    for k, trace in enumerate(traces):
      if pos[k] == len(trace["worker"]):
        continue
      m, s = int(trace["worker"][pos[k]]), int(trace["seq"][pos[k]])
      if (m, s) not in grads:
        if not (done[:, m] >= s - 1).all():
          continue  # Not computable yet: another shard is behind.
        full, batch = layout.join(held[m]), data_fn(m, s)
        pushed = [grad_fn(full, batch)]
        if push_grad_sq:
          pushed.append(_per_example_mean_square(loss_fn, full, batch))
        grads[(m, s)] = [split(tree) for tree in pushed]
      pushed = [tree[k] for tree in grads[(m, s)]]
      if all(np.isfinite(x).all() for tree in grads[(m, s)]
             for s_ in tree for x in s_):
        shards[k] = step(k, shards[k], backups[m][k], *pushed)
      held[m][k] = backups[m][k] = list(shards[k])
      done[k, m], pos[k] = s, pos[k] + 1
  return layout.join(shards)


@pytest.mark.slow  # ~12 s; one shard's exact replay stays in make test
@pytest.mark.usefixtures("local_ray")
def test_two_shards_apply_delay_compensation_exactly_and_skip_a_nan():
  loss_fn, data_fn, params, _ = digits_problem(nan_at=(1, 2))
  lr, lam = 0.5, 2.0
  tx = optax.chain(dcasgd_optax.delay_compensation(2, lam), optax.sgd(lr))
  # The pieces travel in the actor calls here (the other tests use the
  # shared-memory channel, the default on one node).
  result = dray.train(loss_fn, tx, params, data_fn, 2, 40, num_shards=2,
                      shared_memory=False)
  rec = result.records
  check_exactly_once(rec, 2)
  assert len(result.shard_records) == 2
  for trace in result.shard_records:  # Every shard got every gradient once.
    check_exactly_once(trace, 2)
    np.testing.assert_array_equal(trace["step"], np.arange(1, 41))
    assert not trace["shared"].any()  # In the calls, as asked.
  skipped = rec.skipped & (rec.worker == 1) & (rec.seq == 2)
  assert rec.skipped.sum() == 1 and skipped.sum() == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(
      (result.params, result.opt_state)))
  layout = make_layout(params, 2)
  want = _sharded_reference(loss_fn, data_fn, params, layout,
                            result.shard_records, _dc_step(lr, lam))
  chex.assert_trees_all_close(result.params, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~15 s; tests/test_ray_grad_sq.py covers the shard fast
@pytest.mark.usefixtures("local_ray")
def test_one_shard_fisher_run_replays_exactly_in_the_simulator():
  # push_grad_sq: each worker pushes its per-example mean square with the
  # gradient (through the shared-memory channel: one node, the default).
  loss_fn, data_fn, params, accuracy = digits_problem()
  tx = dcasgd_optax.fisher_dcasgd(0.5, 3)  # DC-ASGD-a's normalisation.
  result = dray.train(loss_fn, tx, params, data_fn, num_updates=60,
                      push_grad_sq=True)
  rec = result.records
  check_exactly_once(rec, 3)
  assert not rec.skipped.any() and result.shard_records[0]["shared"].all()
  assert accuracy(result.params) > 0.8  # Chance is 0.1.
  sim = Simulator(loss_fn, tx, num_workers=3, push_grad_sq=True)
  state, metrics = sim.replay(sim.init(params), trace_batches(data_fn, rec),
                              schedules.from_trace(rec, num_workers=3))
  np.testing.assert_array_equal(metrics["staleness"], rec.staleness)
  assert (rec.staleness > 0).mean() > 0.5  # The curvature term is at work.
  np.testing.assert_allclose(metrics["loss"], rec.loss, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close((state.params, state.opt_state),
                              (result.params, result.opt_state), rtol=1e-6,
                              atol=1e-7)
  assert not alive_actors()


@pytest.mark.slow  # ~10 s; the secant's maths is tested in test_secant.py
@pytest.mark.usefixtures("local_ray")
def test_one_shard_delayed_nesterov_secant_run_replays_in_the_simulator():
  # The secant compensation before delayed Nesterov: the server keeps each
  # worker's previous backup and gradient beside its backup; Ray needs
  # nothing of its own for it (it finds the backups as for DC-ASGD).
  loss_fn, data_fn, params, accuracy = digits_problem()
  tx = dcasgd_optax.delayed_nesterov_secant_dcasgd(1.5, 3, lambda_=1.0)
  result = dray.train(loss_fn, tx, params, data_fn, num_updates=60)
  rec = result.records
  check_exactly_once(rec, 3)
  assert not rec.skipped.any() and result.shard_records[0]["shared"].all()
  assert accuracy(result.params) > 0.8  # Chance is 0.1.
  sim = Simulator(loss_fn, tx, num_workers=3)
  state, metrics = sim.replay(sim.init(params), trace_batches(data_fn, rec),
                              schedules.from_trace(rec, num_workers=3))
  np.testing.assert_array_equal(metrics["staleness"], rec.staleness)
  is_secant = lambda x: isinstance(x, dcasgd_optax.SecantCompensationState)
  (secant,) = [x for x in jax.tree.leaves(result.opt_state, is_leaf=is_secant)
               if is_secant(x)]
  assert np.asarray(secant.seen).all()  # Every worker's secant is at work.
  np.testing.assert_allclose(metrics["loss"], rec.loss, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close((state.params, state.opt_state),
                              (result.params, result.opt_state), rtol=1e-6,
                              atol=1e-7)
  assert not alive_actors()


def _fisher_step(lr, lam, decay=0.95, eps=1e-7):
  """fisher_dcasgd (adaptive, one running mean) on one shard's pieces:
  ``(shard, w, backup, g, grad_sq) -> w``."""
  mean_square = {}

  def step(k, w, b, g, f):
    ms = mean_square.get(k, [np.zeros_like(x) for x in f])
    ms = mean_square[k] = [decay * m + (1 - decay) * x for m, x in zip(ms, f)]
    return [w_ - lr * (g_ + lam / np.sqrt(m + eps) * f_ * (w_ - b_))
            for w_, g_, f_, b_, m in zip(w, g, f, b, ms)]

  return step


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_two_shards_split_grad_sq_exactly_and_skip_a_non_finite_one():
  loss_fn, data_fn, params, _ = digits_problem()

  def huge_at_1_2(worker, seq):
    # Pixel 0 is 0 in every digit, so its weights stay 0: with it 1e20,
    # gradient (1, 2) is finite and its per-example squares overflow.
    x, y = data_fn(worker, seq)
    if (worker, seq) == (1, 2):
      x = x.copy()
      x[3, 0] = 1e20
    return x, y

  lr, lam = 0.3, 2.0
  tx = dcasgd_optax.fisher_dcasgd(lr, 2, lambda_=lam)
  # In the actor calls: the one-shard run above uses the channel.
  result = dray.train(loss_fn, tx, params, huge_at_1_2, 2, 40, num_shards=2,
                      shared_memory=False, push_grad_sq=True)
  rec = result.records
  for trace in result.shard_records:  # Every shard got every push once.
    check_exactly_once(trace, 2)
    assert not trace["shared"].any()
  skipped = rec.skipped & (rec.worker == 1) & (rec.seq == 2)
  assert rec.skipped.sum() == 1 and skipped.sum() == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(
      (result.params, result.opt_state)))
  layout = make_layout(params, 2)
  assert any(not layout.is_whole(p) for s in layout.pieces for p in s)
  want = _sharded_reference(loss_fn, huge_at_1_2, params, layout,
                            result.shard_records, _fisher_step(lr, lam),
                            push_grad_sq=True)
  chex.assert_trees_all_close(result.params, want, rtol=1e-4, atol=1e-6)


def _sequential_reference(loss_fn, tx, params, data_fn, num_updates):
  """One worker, one optax step at a time; params and gradients rounded to
  bfloat16 where they travel."""
  state = tx.init(params)
  for seq in range(num_updates):
    held = jax.tree.map(_bf16, params)
    state = dcasgd_optax.record_pull(state, held, 0)
    grads = jax.grad(loss_fn)(held, data_fn(0, seq))
    grads = jax.tree.map(_bf16, grads)
    updates, state = tx.update(grads, state, params, worker=0)
    params = optax.apply_updates(params, updates)
  state = dcasgd_optax.record_pull(state, jax.tree.map(_bf16, params), 0)
  return params, state


def _three_shards_in_bfloat16(tmp_path):
  loss_fn, data_fn, params, _ = digits_problem()
  tx = optax.chain(dcasgd_optax.delay_compensation(1, 2.0, adaptive=True),
                   optax.sgd(0.3, momentum=0.9))
  run = lambda n, **kw: dray.train(
      loss_fn, tx, params, data_fn, 1, n, num_shards=3,
      wire_dtype=jnp.bfloat16, checkpoint_dir=str(tmp_path), **kw)
  reference = lambda n: _sequential_reference(loss_fn, tx, params, data_fn, n)
  return run, reference


@pytest.mark.slow  # ~14 s
@pytest.mark.usefixtures("local_ray")
def test_three_shards_in_bfloat16_match_a_sequential_loop(tmp_path):
  run, reference = _three_shards_in_bfloat16(tmp_path)
  result = run(20, checkpoint_every=10)
  np.testing.assert_array_equal(result.records.seq, np.arange(20))
  # Saved at 10 (the workers paused) and at the end, every shard alike.
  saved = {p.name: sorted(os.listdir(p)) for p in tmp_path.iterdir()}
  assert saved == {f"shard-{k}-of-3": ["10", "20"] for k in range(3)}
  chex.assert_trees_all_close((result.params, result.opt_state),
                              reference(20), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_three_shards_resume_from_their_checkpoints(tmp_path):
  run, reference = _three_shards_in_bfloat16(tmp_path)
  run(20, checkpoint_every=10)
  resumed = run(30, resume=True)
  np.testing.assert_array_equal(resumed.records.step, np.arange(21, 31))
  np.testing.assert_array_equal(resumed.records.seq, np.arange(20, 30))
  chex.assert_trees_all_close((resumed.params, resumed.opt_state),
                              reference(30), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("local_ray")
def test_a_failing_worker_is_named_and_nothing_is_left_running():
  loss_fn, data_fn, params, _ = digits_problem()

  def failing(worker, seq):  # Raises in worker 1's actor, at its 3rd batch.
    if (worker, seq) == (1, 2) and ray.get_runtime_context().get_actor_id():
      raise OSError("batch 2 of worker 1 is unreadable")
    return data_fn(worker, seq)

  # The run stops at the failure, so num_updates only has to be more than
  # worker 0 can do alone while worker 1 computes 3 gradients: with 40, one
  # loaded run (-n 2, beside the slow Ray tests) finished without raising.
  with pytest.raises(RuntimeError, match=r"(?s)Worker 1 failed:.*batch 2 of "
                     "worker 1 is unreadable"):
    dray.train(loss_fn, optax.sgd(0.5), params, failing, num_workers=2,
               num_updates=2000)
  assert ray.is_initialized() and not alive_actors()


def _num_actors():
  """How many actors Ray has ever started (0 if Ray is not running)."""
  if not ray.is_initialized():
    return 0
  return len(ray._private.state.actors())  # pylint: disable=protected-access


@pytest.mark.usefixtures("ray_env")
def test_bad_arguments_fail_before_any_actor_starts():
  was_running, before = ray.is_initialized(), _num_actors()
  loss_fn, data_fn, params, _ = digits_problem()
  sgd = optax.sgd(0.1)
  fisher = dcasgd_optax.fisher_dcasgd(0.1, 3)
  bad = [
      (dict(tx=dcasgd_optax.dcasgd(0.1, 4)), "`num_workers` is 3"),
      (dict(num_workers=None), "`num_workers` is None"),
      (dict(num_updates=0), "num_updates"),
      (dict(resume=True), "checkpoint_dir"),
      (dict(num_shards=0), r"`num_shards` must be in \[1, 650\]"),
      (dict(num_shards=651), r"`num_shards` must be in \[1, 650\]"),
      (dict(num_shards=2, server_options=[{}]), "one per shard"),
      (dict(data_fn=lambda m, s: (np.zeros((8, 63)), np.zeros(8, int))),
       "does not fit `loss_fn`"),
      (dict(tx=optax.adafactor(0.1, min_dim_size_to_factor=8), num_shards=2),
       "cannot be split"),
      (dict(wire_dtype=np.int8), "wire_dtype"),
      (dict(shared_memory="yes"), "`shared_memory` must be a bool"),
      (dict(push_grad_sq=1), "`push_grad_sq` must be a bool"),
      (dict(push_grad_sq=True), "`tx.update` does not read `grad_sq`"),
      (dict(tx=fisher), "pass `push_grad_sq=True`"),
      # Per-example gradients need every leaf to have the example axis.
      (dict(tx=fisher, push_grad_sq=True,
            loss_fn=lambda p, b: loss_fn(p, b[:2]) + 0.0 * b[2].sum(),
            data_fn=lambda m, s: (*data_fn(m, s), np.zeros(3, np.float32))),
       r"`push_grad_sq=True`.*leading \(example\) axis"),
  ]
  for kwargs, match in bad:
    args = dict(loss_fn=loss_fn, tx=sgd, params=params, data_fn=data_fn,
                num_workers=3, num_updates=10)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
      dray.train(**args)
  assert ray.is_initialized() == was_running  # Nothing was started.
  assert _num_actors() == before

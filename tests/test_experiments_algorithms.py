"""experiments.algorithms: the registry, and what each record builds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import algorithms
from experiments import optimizers
from experiments.configs import default

M, S = 4, 100  # workers, gradients per epoch


def _config(name, **fields):
  c = default.get_config()
  c.algorithm, c.num_workers, c.learning_rate = name, M, 0.1
  c.update(fields)
  return c


def _updates(config, grads, *, staleness, params=None, state=None):
  """``make_tx``'s first update of ``grads`` as worker 1, fresh state."""
  tx = algorithms.make_tx(config, M, S)
  params = params or {"w": jnp.zeros(3)}
  state = state or tx.init(params)
  return _jit_update(tx)(grads, state, params, 1, staleness)


def _jit_update(tx):
  return jax.jit(
      lambda g, s, p, worker, staleness: tx.update(
          g, s, p, worker=worker, staleness=staleness
      )
  )


GRADS = {"w": jnp.array([1.0, -2.0, 0.5])}


def test_names_labels_and_styles_are_each_spelled_once():
  records = list(algorithms.REGISTRY.values())
  assert [a.name for a in records] == list(algorithms.REGISTRY)
  labels = [a.label for a in records]
  assert len(set(labels)) == len(labels)
  assert (
      algorithms.SEQUENTIAL.single_worker
      and algorithms.SEQUENTIAL.effective_workers(8) == 1
  )
  assert algorithms.get("ssgd").gradients_per_update(8) == 8
  assert algorithms.ASGD.gradients_per_update(8) == 1
  with pytest.raises(ValueError, match="valid choices: sequential, ssgd, asgd"):
    algorithms.get("hogwild")


@pytest.mark.parametrize(
    "opt,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0), ("muon", 0.0)]
)
def test_every_record_builds_where_it_applies(opt, momentum):
  params = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  for name, algorithm in algorithms.REGISTRY.items():
    config = _config(name, optimizer=opt, momentum=momentum)
    needs_momentum = name in (
        "delayed-nesterov",
        "delayed-nesterov-dc",
        "delayed-nesterov-secant",
        "dana",
        "dana-dc",
        "wp-nesterov",
    )
    sgd_only = name == "gap-aware"
    adam_only = name == "wp-nadam"
    expected = (
        not (needs_momentum and not momentum)
        and not (sgd_only and opt != "sgd")
        and not (adam_only and opt != "adam")
    )
    assert algorithm.applies_to(config) == expected, name
    if expected:  # traced, not compiled: the numbers are tested below
      tx = algorithms.make_tx(config, M, S)
      state = jax.eval_shape(tx.init, params)
      updates, _ = jax.eval_shape(
          lambda s, p, tx=tx: tx.update(
              p, s, p, worker=1, staleness=M - 1, grad_sq=p
          ),
          state,
          params,
      )
      assert updates["w"].shape == (3,), name


def test_the_learning_rate_is_injected_so_one_program_serves_a_sweep():
  config = _config("dc-asgd-a-tuned", dc_lambda=4.0)
  tx = algorithms.make_tx(config, M, S)
  state = tx.init({"w": jnp.zeros(3)})
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
  assert float(state.hyperparams["dc_lambda"]) == 4.0
  abstract = lambda c: jax.eval_shape(
      algorithms.make_tx(c, M, S).init, {"w": jnp.zeros(3)}
  )
  assert jax.tree.structure(abstract(_config("asgd", learning_rate=0.3))) == (
      jax.tree.structure(abstract(_config("asgd", learning_rate=0.1)))
  )
  doubled = state._replace(
      hyperparams={**state.hyperparams, "learning_rate": jnp.float32(0.2)}
  )
  update = _jit_update(tx)
  u1, _ = update(GRADS, state, {"w": jnp.zeros(3)}, 1, 0)
  u2, _ = update(GRADS, doubled, {"w": jnp.zeros(3)}, 1, 0)
  np.testing.assert_allclose(u2["w"], 2 * u1["w"], rtol=1e-6)


def test_asgd_is_the_optimizer_and_the_rules_scale_its_step():
  config = _config("asgd")
  asgd, _ = _updates(config, GRADS, staleness=3)
  np.testing.assert_allclose(asgd["w"], -0.1 * GRADS["w"], rtol=1e-6)
  for name, scale in [
      ("sa-asgd", 1 / 3),
      ("sqrt-asgd", 1 / 2),
      ("da-asgd", 1.0),
  ]:
    u, _ = _updates(_config(name), GRADS, staleness=3)
    np.testing.assert_allclose(u["w"], scale * asgd["w"], rtol=1e-6)
  u, _ = _updates(_config("da-asgd"), GRADS, staleness=2 * M)  # τ > M: M / τ
  np.testing.assert_allclose(u["w"], 0.5 * asgd["w"], rtol=1e-6)


def test_adam_core_and_the_adjustment_comes_first():
  config = _config("sa-asgd", optimizer="adam", learning_rate=1e-3)
  u, _ = _updates(config, GRADS, staleness=3)
  # Adam normalizes the scaled gradient: the first step is -lr * sign(g).
  np.testing.assert_allclose(u["w"], -1e-3 * np.sign(GRADS["w"]), rtol=1e-4)


def test_delayed_nesterov_steps_like_asgd_per_push_adds_momentum_per_period():
  config = _config("delayed-nesterov", momentum=0.9)
  tx = algorithms.make_tx(config, M, S)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  steps, update = [], _jit_update(tx)
  for _ in range(M):
    u, state = update(GRADS, state, params, 0, 0)
    steps.append(u["w"])
  for u in steps[:-1]:  # a plain step of the per-push rate, as ASGD's
    np.testing.assert_allclose(u, -0.1 * GRADS["w"], rtol=1e-6)
  # At the period's end the momentum m = mean gradient moves the model by
  # N * lr * μ * m on top: 0.4 * 0.9 * g.
  np.testing.assert_allclose(
      steps[-1], -(0.1 + 0.4 * 0.9) * GRADS["w"], rtol=1e-5
  )


def test_gap_aware_leaves_a_fresh_gradient_alone_and_damps_a_moved_coordinate():
  config = _config("gap-aware")
  fresh, _ = _updates(config, GRADS, staleness=0)
  np.testing.assert_allclose(fresh["w"], -0.1 * GRADS["w"], rtol=1e-6)
  tx = algorithms.make_tx(config, M, S)
  state = tx.init({"w": jnp.zeros(3)})  # every worker holds 0
  moved = {"w": jnp.array([0.0, 0.0, 1.0])}
  u, _ = _jit_update(tx)(GRADS, state, moved, 1, 5)
  np.testing.assert_allclose(u["w"][:2], -0.1 * GRADS["w"][:2], rtol=1e-6)
  assert abs(u["w"][2]) < 0.1 * abs(GRADS["w"][2]) / 2


def test_gradient_adjustment_is_the_chains_first_transformation():
  assert algorithms.gradient_adjustment(_config("asgd"), M, S) is None
  dc = algorithms.gradient_adjustment(_config("dc-asgd-a", dc_lambda=2.0), M, S)
  params = {"w": jnp.ones(3)}
  state = dc.init(params)
  held = {"w": jnp.zeros(3)}  # worker 1 computed at 0; the server holds 1
  state = state._replace(
      backups=jax.tree.map(lambda b, h: b.at[1].set(h), state.backups, held)
  )
  g, _ = jax.jit(lambda s: dc.update(GRADS, s, params, worker=1))(state)
  ms = 0.05 * GRADS["w"] ** 2
  want = GRADS["w"] + 2.0 / jnp.sqrt(ms + 1e-7) * GRADS["w"] ** 2 * 1.0
  np.testing.assert_allclose(g["w"], want, rtol=1e-5)


def test_a_warm_up_and_boundaries_scale_the_injected_rate():
  config = _config("asgd", warmup_epochs=1.0, lr_boundaries_epochs=(2,))
  relative = optimizers.relative_schedule(config, S)
  assert float(relative(0)) == pytest.approx(0.1)
  assert float(relative(S)) == pytest.approx(1.0)
  assert float(relative(2 * S + 1)) == pytest.approx(0.1)
  tx = algorithms.make_tx(config, M, S)
  state = tx.init({"w": jnp.zeros(3)})
  u, _ = _jit_update(tx)(GRADS, state, {"w": jnp.zeros(3)}, 0, 0)
  np.testing.assert_allclose(u["w"], -0.01 * GRADS["w"], rtol=1e-5)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)

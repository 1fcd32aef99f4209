"""The harness gives the same answer on 1 and on 8 (fake CPU) devices.

Fake devices must be set before JAX starts, so the comparison runs in a fresh
Python subprocess (safe under pytest-xdist, whose workers have JAX started).
"""

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import os
    import sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import dcasgd_optax
    from dcasgd_optax.harness import Simulator, SyncSimulator, schedules

    jax.config.update("jax_numpy_rank_promotion", "raise")
    STRATEGY = sys.argv[1]
    assert len(jax.devices()) == 8, jax.devices()
    XS = jax.random.normal(jax.random.key(0), (64, 3))
    YS = jnp.sin(XS @ jnp.array([1.0, -2.0, 0.5]))

    def loss_fn(params, idx):
      h = jnp.tanh(XS[idx] @ params["w1"])
      return jnp.mean((h @ params["w2"] - YS[idx]) ** 2)

    def bn_loss_fn(params, state, idx):
      z = XS[idx] @ params["w1"]
      mean = jnp.mean(z, axis=0)
      h = jnp.tanh(z - mean[None])
      loss = jnp.mean((h @ params["w2"] - YS[idx]) ** 2)
      return loss, {"mean": 0.9 * state["mean"] + 0.1 * mean}

    params = {"w1": jnp.full((3, 5), 0.3), "w2": jnp.linspace(-1.0, 1.0, 5)}
    one, eight = jax.devices()[:1], jax.devices()

    def close(a, b):
      jax.tree.map(lambda x, y: np.testing.assert_allclose(
          np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), a, b)

    def workers_only(state, num_workers):
      # The state without the padding rows that round the per-worker
      # storage up to a multiple of the device count (documented layout).
      trim = lambda x: x[:num_workers]
      dc = [s for s in jax.tree.leaves(
          state.opt_state, is_leaf=lambda x: isinstance(
              x, dcasgd_optax.DelayCompensationState))
            if isinstance(s, dcasgd_optax.DelayCompensationState)][0]
      return (state.params, jax.tree.map(trim, dc.backups), dc.mean_square,
              state.model_state,
              jax.tree.map(trim, state.worker_model_states), state.step,
              state.last_pull)

    def run_async(devices, num_workers, arrivals, stateful=False):
      tx = dcasgd_optax.dcasgd(0.1, num_workers, momentum=0.5)
      batches = jnp.asarray(
          np.random.default_rng(0).integers(0, 64, (len(arrivals), 8)))
      fn = bn_loss_fn if stateful else loss_fn
      sim = Simulator(fn, tx, num_workers, devices=devices,
                      has_model_state=stateful, strategy=STRATEGY)
      ms = {"mean": jnp.zeros(5)} if stateful else None
      state = sim.init(params, ms)
      state, m1 = sim.replay(state, batches[:20], arrivals[:20])
      state, m2 = sim.replay(state, batches[20:], arrivals[20:])
      assert state.params["w1"].sharding.device_set == set(devices)
      for m in range(num_workers):  # what each worker holds
        held = dcasgd_optax.worker_params(state.opt_state, m)
        assert held["w1"].shape == (3, 5)
      return workers_only(state, num_workers), m1, m2

    cases = [
        (6, np.random.default_rng(1).integers(0, 6, 50)),  # 6 % 8 != 0
        (16, schedules.cyclic(16, 64)),
        (5, schedules.gamma_speeds(5, 45, seed=0, shape=2.0)),
        (1, np.zeros(30, np.int32)),  # sequential SGD
    ]
    for num_workers, arrivals in cases:
      close(run_async(one, num_workers, arrivals),
            run_async(eight, num_workers, arrivals))
    close(run_async(one, 6, cases[0][1], stateful=True),
          run_async(eight, 6, cases[0][1], stateful=True))

    # replay_many on 8 devices: each simulation as its own replay (shared
    # order and one order per simulation; 6 workers, padded to 8 rows). Both
    # strategies, in the slow run only (it adds a dozen compilations).
    starts = [jax.tree.map(lambda x, i=i: x * (1.0 + 0.5 * i), params)
              for i in range(2)]
    orders = np.random.default_rng(3).integers(0, 6, (2, 16))
    batches = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16, 8)))
    for strategy in (("compiled", "host_chunks")
                     if STRATEGY == "host_chunks" else ()):
      sim = Simulator(loss_fn, dcasgd_optax.dcasgd(0.1, 6, momentum=0.5),
                      devices=eight, strategy=strategy)
      for arrivals in (orders[0], orders):
        states, record = sim.replay_many(sim.init_many(jax.tree.map(
            lambda *x: jnp.stack(x), *starts)), batches, arrivals)
        for i in range(2):
          state, alone = sim.replay(
              sim.init(starts[i]), batches[i],
              orders[i] if arrivals.ndim == 2 else arrivals)
          close(workers_only(jax.tree.map(lambda x: x[i], states), 6),
                workers_only(state, 6))
          close(record["loss"][i], alone["loss"])

    def run_sync(devices, num_workers):
      sim = SyncSimulator(loss_fn, optax.sgd(0.1), num_workers, devices=devices,
                          strategy=STRATEGY)
      batches = jnp.asarray(
          np.random.default_rng(0).integers(0, 64, (4 * num_workers, 8)))
      return sim.replay(sim.init(params), batches)

    for num_workers in (3, 8, 12, 70):  # 70: "host_chunks" 2 groups
      close(run_sync(one, num_workers), run_sync(eight, num_workers))

    # Per-device bytes, from XLA's memory analysis of the replay's program:
    # each device holds 1/8 of the backups, nothing gathers them whole and
    # nothing materialises the stand-in through which tx reads the arriving
    # worker's row (the fused dcasgd loops over that row, a composed chain
    # slices it). The model is large enough for the fused update's loop over
    # blocks on CPU, and 1 and 8 devices give the same numbers.
    wide = {"w": jnp.linspace(-1.0, 1.0, 1 << 16)}
    wide_xs = jax.random.normal(jax.random.key(1), (64, 64))
    wide_loss = lambda p, i: jnp.mean(
        (wide_xs[i] @ p["w"].reshape(64, 1024)) ** 2)
    workers = 32
    backups_bytes = workers * 4 * (1 << 16)
    wide_batches = np.random.default_rng(2).integers(0, 64, (2 * workers, 8))
    wide_arrivals = schedules.gamma_speeds(workers, 2 * workers, seed=1)
    txs = {
        "dcasgd": lambda: dcasgd_optax.dcasgd(0.1, workers),
        "composed": lambda: dcasgd_optax.pull_after_push(optax.chain(
            dcasgd_optax.delay_compensation(workers, 2.0, adaptive=True),
            optax.sgd(0.1, momentum=0.9))),
    }
    for name, make in txs.items():
      analyses, results = {}, {}
      for devices in (one, eight):
        sim = Simulator(wide_loss, make(), devices=devices, strategy=STRATEGY)
        state = sim.init(wide)
        rows = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 2][0]
        assert {s.data.nbytes for s in rows.addressable_shards} == {
            backups_bytes // len(devices)}
        analyses[len(devices)] = sim.lower(
            state, wide_batches, wide_arrivals).compile().memory_analysis()
        state, _ = sim.replay(state, wide_batches, wide_arrivals)
        results[len(devices)] = workers_only(state, workers)
      close(results[1], results[8])
      saved = (analyses[1].argument_size_in_bytes
               - analyses[8].argument_size_in_bytes)
      # The arguments shrink by 7/8 of the backups (small host arrays aside).
      assert abs(saved - backups_bytes * 7 / 8) < 0.01 * backups_bytes, (
          name, saved, backups_bytes)
      assert analyses[8].temp_size_in_bytes < backups_bytes / 2, (
          name, analyses[8])

    # A per-worker mean square beside the stand-in backups: the fused update
    # (on CPU, its kernel) takes the arriving worker's row of both.
    per_worker = {}
    for devices in (one, eight):
      sim = Simulator(wide_loss, dcasgd_optax.dcasgd(
          0.1, workers, per_worker_mean_square=True), devices=devices,
                      strategy=STRATEGY)
      state, _ = sim.replay(sim.init(wide), wide_batches, wide_arrivals)
      per_worker[len(devices)] = workers_only(state, workers)
    close(per_worker[1], per_worker[8])

    # Workers that push grad_sq (fisher_compensation): the per-example
    # curvature travels with the gradient, from the device that computed it.
    fisher = {}
    fisher_batches = jnp.asarray(
        np.random.default_rng(5).integers(0, 64, (30, 8)))
    for devices in (one, eight):
      sim = Simulator(loss_fn, dcasgd_optax.fisher_dcasgd(0.1, 6, lambda_=1.0),
                      devices=devices, strategy=STRATEGY, push_grad_sq=True)
      state, _ = sim.replay(sim.init(params), fisher_batches,
                            cases[0][1][:30])
      fisher[len(devices)] = workers_only(state, 6)
    close(fisher[1], fisher[8])

    # The secant compensation: its state holds the DelayCompensationState
    # beside two more per-worker copies (previous backups and gradients),
    # all padded to 8 rows; the final model, its state and the curvature
    # ratio agree on 1 and 8 devices.
    secant = {}
    for devices in (one, eight):
      sim = Simulator(loss_fn, dcasgd_optax.secant_dcasgd(
          0.1, 6, lambda_=1.0, momentum=0.5), devices=devices,
                      strategy=STRATEGY, diagnose_curvature=True)
      state, record = sim.replay(sim.init(params), fisher_batches,
                                 cases[0][1][:30])
      node = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x:
              isinstance(x, dcasgd_optax.SecantCompensationState))
              if isinstance(s, dcasgd_optax.SecantCompensationState)][0]
      secant[len(devices)] = (
          workers_only(state, 6), record["curvature_ratio"],
          jax.tree.map(lambda x: x[:6], (node.previous_backups,
                                         node.previous_grads, node.seen)),
          node.numerator, node.denominator)
    assert np.nanmax(np.abs(np.asarray(secant[1][1]))) > 0  # it corrected
    close(secant[1], secant[8])

    # Diagnostics with 6 workers on 8 devices (backups padded to 8 rows):
    # the compensation found by the simulator (dcasgd's own, with the
    # curvature ratio) and one passed as first_transform (a composed chain).
    def diagnosed(devices, make_sim):
      sim = make_sim(devices)
      _, record = sim.replay(sim.init(params), batches_6,
                             cases[0][1][:20])
      return record

    batches_6 = jnp.asarray(np.random.default_rng(0).integers(0, 64, (20, 8)))
    dc = dcasgd_optax.delay_compensation(6, 2.0, adaptive=True)
    sims = [
        lambda d: Simulator(loss_fn, dcasgd_optax.dcasgd(0.1, 6, momentum=0.5),
                            devices=d, strategy=STRATEGY,
                            diagnose_curvature=True),
        lambda d: Simulator(loss_fn, dcasgd_optax.pull_after_push(
            optax.chain(dc, optax.sgd(0.1))), devices=d, strategy=STRATEGY,
                            diagnostics=True, first_transform=dc),
    ]
    for make_sim in sims:
      want, got = diagnosed(one, make_sim), diagnosed(eight, make_sim)
      assert set(got) == set(want), (sorted(got), sorted(want))
      assert np.isfinite(np.asarray(got["applied_error"])).all()
      assert ("curvature_ratio" in want) == (make_sim is sims[0])
      if "curvature_ratio" in want:  # measured where w - w_m is not 0
        stale = np.asarray(got["staleness"]) > 0
        assert stale.sum() > 10
        assert np.isfinite(np.asarray(got["curvature_ratio"])[stale]).all()
      close(want, got)
    print("OK")
""")


# "compiled" (the default on GPU and TPU, where several devices are the rule)
# runs by default; "host_chunks" (the CPU default) is the slow variant: each
# subprocess compiles some twenty programs.
@pytest.mark.parametrize("strategy", [
    "compiled", pytest.param("host_chunks", marks=pytest.mark.slow)])
def test_one_and_eight_devices_agree(strategy):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-c", _SCRIPT, strategy], cwd=root, env=env,
      capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.strip().endswith("OK")

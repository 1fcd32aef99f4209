"""The NNX models and their pure-function adapter."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models


@pytest.mark.parametrize(
    "name,shape",
    [
        ("mlp", (28, 28, 1)),
        ("small_cnn", (28, 28, 1)),
        pytest.param("resnet20", (32, 32, 3), marks=pytest.mark.slow),
    ],
)
def test_models_map_images_to_logits_under_jit(name, shape):
  model = models.create(name, image_shape=shape, num_classes=10, seed=0)
  apply, params, model_state = models.functional(model)
  x = jax.random.normal(jax.random.key(0), (3, *shape))
  fn = jax.jit(lambda p, s, x: apply(p, s, x, train=False))
  logits, _ = fn(params, model_state, x)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  np.testing.assert_allclose(
      logits, model(x, train=False), rtol=1e-5, atol=1e-5
  )


def test_resnet20_has_he_et_al_size_and_layers():
  model = models.ResNet20(rngs=nnx.Rngs(0))
  _, params, model_state = models.functional(model)
  # He et al. 2016, Table 6: 0.27M parameters with option-A shortcuts.
  assert models.num_params(params) == 269_722
  convs = [p for p in jax.tree.leaves(params) if p.ndim == 4]
  assert len(convs) == 19  # + the classifier = 20 weighted layers
  assert len(jax.tree.leaves(model_state)) == 2 * 19  # BN mean and var


def test_batchnorm_statistics_update_only_in_training():
  model = models.ResNet20(rngs=nnx.Rngs(0))
  apply, params, state = models.functional(model)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) + 3.0
  _, same = apply(params, state, x, train=False)
  _, moved = apply(params, state, x, train=True)
  chex.assert_trees_all_equal(same, state)
  assert not np.allclose(moved["bn"]["mean"], state["bn"]["mean"])


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
  block = models.BasicBlock(16, 32, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))
  y = block.shortcut(x)
  assert y.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
  assert not np.any(y[..., :8]) and not np.any(y[..., 24:])


def test_models_without_batchnorm_have_empty_model_state():
  _, params, model_state = models.functional(
      models.MLP(4, (8,), 3, rngs=nnx.Rngs(0))
  )
  assert (
      model_state == {} and models.num_params(params) == 4 * 8 + 8 + 8 * 3 + 3
  )


def test_same_seed_same_init_and_other_seed_other_init():
  a = models.functional(
      models.create(
          "small_cnn", image_shape=(28, 28, 1), num_classes=10, seed=3
      )
  )[1]
  b = models.functional(
      models.create(
          "small_cnn", image_shape=(28, 28, 1), num_classes=10, seed=3
      )
  )[1]
  c = models.functional(
      models.create(
          "small_cnn", image_shape=(28, 28, 1), num_classes=10, seed=4
      )
  )[1]
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a["head"]["kernel"], c["head"]["kernel"])


def test_unknown_model_lists_the_choices():
  with pytest.raises(
      ValueError, match="valid choices: mlp, small_cnn, resnet20"
  ):
    models.create("vgg", image_shape=(28, 28, 1), num_classes=10, seed=0)

"""Flax NNX models and a pure-function adapter for the simulator.

* :class:`MLP` and :class:`SmallCNN` for 28x28x1 inputs (MNIST-sized).
* :class:`ResNet20` for CIFAR-10, as in He et al. 2016, section 4.2: a 3x3
  stem with 16 channels, then 3 stages of 3 basic blocks with 16, 32 and 64
  channels (stride 2 at the start of stages 2 and 3), BatchNorm after every
  convolution, global average pooling and a linear classifier: 6n + 2 = 20
  layers for n = 3, 0.27M parameters. Shortcuts use **option A** of the
  paper (the one it uses on CIFAR-10): identity, and where the shape changes,
  a stride-2 subsample with the new channels zero-padded, so shortcuts have
  no parameters.

Every model is called as ``model(x_BxHxWxC, train=...)`` and returns logits
``[B, num_classes]``. The simulator wants pure functions of arrays, so
:func:`functional` splits a model into ``(apply, params, model_state)``, the
latter two plain nested dicts (the ``nnx.Param`` and ``nnx.BatchStat``
variables).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

# (params, model_state, x, *, train) -> (logits, new_model_state)
ApplyFn = Callable[..., tuple[jax.Array, Any]]

_he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class MLP(nnx.Module):
  """A ReLU multilayer perceptron on flattened images.

  Args:
    in_features: number of input features (pixels times channels).
    hidden: widths of the hidden layers.
    num_classes: number of outputs.
    rngs: the ``nnx.Rngs`` for initialization.
  """

  def __init__(
      self,
      in_features: int,
      hidden: Sequence[int],
      num_classes: int,
      *,
      rngs: nnx.Rngs,
  ):
    sizes = [in_features, *hidden]
    self.hidden = nnx.List(
        [
            nnx.Linear(a, b, kernel_init=_he_normal, rngs=rngs)
            for a, b in zip(sizes[:-1], sizes[1:])
        ]
    )
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    del train  # No dropout or BatchNorm.
    h = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for layer in self.hidden:
      h = nnx.relu(layer(h))
    return self.head(h)


class SmallCNN(nnx.Module):
  """Two 3x3 conv + 2x2 average-pool stages, then a hidden dense layer.

  Args:
    in_channels: channels of the input images.
    num_classes: number of outputs.
    features: channels of the two conv layers.
    hidden: width of the dense layer.
    image_size: height (= width) of the input, to size the dense layer.
    rngs: the ``nnx.Rngs`` for initialization.
  """

  def __init__(
      self,
      in_channels: int,
      num_classes: int,
      *,
      features: Sequence[int] = (16, 32),
      hidden: int = 128,
      image_size: int = 28,
      rngs: nnx.Rngs,
  ):
    c1, c2 = features
    self.conv1 = nnx.Conv(
        in_channels, c1, (3, 3), kernel_init=_he_normal, rngs=rngs
    )
    self.conv2 = nnx.Conv(c1, c2, (3, 3), kernel_init=_he_normal, rngs=rngs)
    flat = (image_size // 4) ** 2 * c2
    self.dense = nnx.Linear(flat, hidden, kernel_init=_he_normal, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    del train
    h = nnx.avg_pool(nnx.relu(self.conv1(x_BxHxWxC)), (2, 2), (2, 2))
    h = nnx.avg_pool(nnx.relu(self.conv2(h)), (2, 2), (2, 2))
    h = nnx.relu(self.dense(h.reshape(h.shape[0], -1)))
    return self.head(h)


def _conv_bn(c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
  conv = nnx.Conv(
      c_in,
      c_out,
      (3, 3),
      strides=(stride, stride),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      kernel_init=_he_normal,
      rngs=rngs,
  )
  # momentum 0.9 and epsilon 1e-5: the usual CIFAR ResNet settings.
  return conv, nnx.BatchNorm(c_out, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with an option-A (parameter-free) shortcut."""

  def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1, self.bn1 = _conv_bn(c_in, c_out, stride, rngs)
    self.conv2, self.bn2 = _conv_bn(c_out, c_out, 1, rngs)
    self.stride = stride
    self.pad = c_out - c_in

  def shortcut(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Identity, or subsample by the stride and zero-pad the new channels."""
    if self.stride == 1 and self.pad == 0:
      return x_BxHxWxC
    x = x_BxHxWxC[:, :: self.stride, :: self.stride, :]
    lo = self.pad // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.pad - lo)))

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    avg = not train
    h = nnx.relu(self.bn1(self.conv1(x_BxHxWxC), use_running_average=avg))
    h = self.bn2(self.conv2(h), use_running_average=avg)
    return nnx.relu(h + self.shortcut(x_BxHxWxC))


class ResNet20(nnx.Module):
  """ResNet-(6n+2) for 32x32 images; ``blocks_per_stage=3`` is ResNet-20.

  Args:
    num_classes: number of outputs.
    in_channels: channels of the input images.
    blocks_per_stage: ``n`` in He et al.'s 6n + 2 (3 -> 20 layers).
    rngs: the ``nnx.Rngs`` for initialization.
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      in_channels: int = 3,
      blocks_per_stage: int = 3,
      rngs: nnx.Rngs,
  ):
    self.conv, self.bn = _conv_bn(in_channels, 16, 1, rngs)
    blocks = []
    c_in = 16
    for stage, c_out in enumerate((16, 32, 64)):
      for i in range(blocks_per_stage):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(BasicBlock(c_in, c_out, stride, rngs=rngs))
        c_in = c_out
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    h = nnx.relu(self.bn(self.conv(x_BxHxWxC), use_running_average=not train))
    for block in self.blocks:
      h = block(h, train=train)
    return self.head(h.mean(axis=(1, 2)))


MODELS = ("mlp", "small_cnn", "resnet20")


def create(
    name: str,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    seed: int,
    mlp_hidden: Sequence[int] = (128,),
) -> nnx.Module:
  """Builds model ``name`` (one of :data:`MODELS`) for the given input shape."""
  rngs = nnx.Rngs(seed)
  h, w, c = image_shape
  if name == "mlp":
    return MLP(h * w * c, tuple(mlp_hidden), num_classes, rngs=rngs)
  if name == "small_cnn":
    return SmallCNN(c, num_classes, image_size=h, rngs=rngs)
  if name == "resnet20":
    return ResNet20(num_classes, in_channels=c, rngs=rngs)
  raise ValueError(
      f"Unknown model {name!r}; valid choices: {', '.join(MODELS)}."
  )


def functional(model: nnx.Module) -> tuple[ApplyFn, dict, dict]:
  """Splits an NNX model into a pure ``apply`` and its variables as dicts.

  Args:
    model: a model called as ``model(x, train=...)``, holding only
      ``nnx.Param`` and ``nnx.BatchStat`` variables.

  Returns:
    ``(apply, params, model_state)``: ``params`` the ``nnx.Param`` values and
    ``model_state`` the ``nnx.BatchStat`` values (``{}`` without BatchNorm),
    both plain nested dicts; ``apply(params, model_state, x, *, train)``
    returns ``(logits, new_model_state)``, where the BatchNorm statistics
    are updated only when ``train`` is true.

  Examples:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = MLP(4, (8,), 3, rngs=nnx.Rngs(0))
    >>> apply, params, model_state = functional(model)
    >>> x = jnp.ones((2, 2, 2, 1))
    >>> logits, _ = apply(params, model_state, x, train=False)
    >>> logits.shape
    (2, 3)
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)

  def apply(params, model_state, x_BxHxWxC, *, train: bool):
    m = nnx.merge(graphdef, params, model_state)
    logits = m(x_BxHxWxC, train=train)
    return logits, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

  return apply, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)


def num_params(params: Any) -> int:
  """Total number of parameters in a pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))

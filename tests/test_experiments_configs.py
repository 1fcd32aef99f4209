"""experiments/configs: every config file is valid and documents its command."""

import pytest

from experiments import compare
from experiments import train


@pytest.mark.parametrize(
    "name", ["default", "demo", "tiny", "cifar10_resnet20", "ray_async"]
)
def test_every_config_file_is_valid_and_documents_its_command(name):
  module = __import__(f"experiments.configs.{name}", fromlist=["get_config"])
  c = module.get_config()
  train.validate(c)
  for run in compare.run_configs(c):
    train.validate(run)
  assert (
      "python -m experiments." in module.__doc__
      or "make demo" in module.__doc__
  )
  assert "Runtime" in module.__doc__ and "Expected result" in module.__doc__

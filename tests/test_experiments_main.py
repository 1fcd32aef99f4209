"""experiments.main: one run from the command line."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_trains_one_run_from_the_command_line(data_dir, tmp_path):
  cmd = [
      sys.executable, "-m", "experiments.main",
      "--config=experiments/configs/tiny.py", "--config.algorithm=asgd",
      "--config.num_workers=2", "--config.num_epochs=1",
      f"--config.data_dir={data_dir}", f"--workdir={tmp_path}",
  ]
  out = subprocess.run(
      cmd, cwd=ROOT, capture_output=True, text=True, check=True
  )
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert summary["algorithm"] == "asgd" and summary["workers"] == 2
  assert json.dumps(summary, indent=2) in out.stdout  # printed at the end

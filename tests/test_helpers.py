"""The test helpers that start processes give them this process's torch thread count (losses
compared across processes are only bit-equal at the same count)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import child_env, launch_two_processes


def test_a_subprocess_started_with_child_env_runs_at_the_parents_thread_count():
    code = "import torch; print(torch.get_num_threads())"  # no set_num_threads: the environment alone
    result = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"child failed:\n{result.stderr[-2000:]}"
    assert int(result.stdout) == torch.get_num_threads(), (
        f"child runs {result.stdout.strip()} threads, the parent {torch.get_num_threads()}"
    )


def _write_thread_count(out: str) -> None:
    rank = torch.distributed.get_rank()
    Path(out, f"threads_{rank}.json").write_text(json.dumps(torch.get_num_threads()))


@pytest.mark.parametrize("threads", [1, 2])
def test_two_process_workers_run_at_the_parents_thread_count(tmp_path, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        launch_two_processes(_write_thread_count, args=(str(tmp_path),))
    finally:
        torch.set_num_threads(before)
    counts = [json.loads((tmp_path / f"threads_{rank}.json").read_text()) for rank in (0, 1)]
    assert counts == [threads, threads], f"workers ran {counts} threads, the parent {threads}"
